"""Optimizer creation: every installed name, typed --optimizer_args, errors and hints, schedule-free modes."""

from __future__ import annotations

import argparse
import importlib.util

import pytest
import torch

from library.errors import UserError
from library.training.optimizers import (
    add_optimizer_arguments, create_optimizer, is_schedule_free, optimizer_train_eval, parse_optimizer_args,
    resolve_optimizer_type, uses_relative_step, validate_optimizer_args,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    return parser.parse_args(list(argv))


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def train_steps(opt: torch.optim.Optimizer, net: torch.nn.Module, steps: int = 3) -> float:
    x = torch.linspace(-1, 1, 32).view(8, 4)
    y = x.sum(dim=1, keepdim=True)
    first = None
    for _ in range(steps):
        loss = ((net(x) - y) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first


INSTALLED = [
    ("AdamW", "torch.optim.adamw.AdamW"),
    ("adamw", "torch.optim.adamw.AdamW"),
    ("Lion", "lion_pytorch.lion_pytorch.Lion"),
    ("SGDNesterov", "torch.optim.sgd.SGD(nesterov=True,momentum=0.9)"),
    ("DAdaptation", "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint"),
    ("DAdaptAdamPreprint", "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint"),
    ("DAdaptAdaGrad", "dadaptation.dadapt_adagrad.DAdaptAdaGrad"),
    ("DAdaptAdam", "dadaptation.dadapt_adam.DAdaptAdam"),
    ("DAdaptAdan", "dadaptation.dadapt_adan.DAdaptAdan"),
    ("DAdaptAdanIP", "dadaptation.experimental.dadapt_adan_ip.DAdaptAdanIP"),
    ("DAdaptLion", "dadaptation.dadapt_lion.DAdaptLion"),
    ("DAdaptSGD", "dadaptation.dadapt_sgd.DAdaptSGD"),
    ("Prodigy", "prodigyopt.prodigy.Prodigy"),
    ("AdaFactor", "transformers.optimization.Adafactor(relative_step=True)"),
    ("RAdamScheduleFree", "schedulefree."),
    ("AdamWScheduleFree", "schedulefree."),
    ("SGDScheduleFree", "schedulefree."),
    ("RMSprop", "torch.optim.rmsprop.RMSprop"),
    ("rmsprop", "torch.optim.rmsprop.RMSprop"),
    ("torch.optim.Adagrad", "torch.optim.adagrad.Adagrad"),
    *(pytest.param(name, prefix, marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                                          reason="bitsandbytes is not installed"))
      for name, prefix in [("AdamW8bit", "bitsandbytes.optim.adamw.AdamW8bit"),
                           ("Lion8bit", "bitsandbytes.optim.lion.Lion8bit"),
                           ("PagedAdamW8bit", "bitsandbytes.optim.adamw.PagedAdamW8bit"),
                           ("PagedLion8bit", "bitsandbytes.optim.lion.PagedLion8bit"),
                           ("SGDNesterov8bit", "bitsandbytes.optim.sgd.SGD8bit(nesterov=True,momentum=0.9)"),
                           ("PagedAdamW", "bitsandbytes.optim.adamw.PagedAdamW"),
                           ("PagedAdamW32bit", "bitsandbytes.optim.adamw.PagedAdamW32bit")]),
]


@pytest.mark.parametrize("name, meta_prefix", INSTALLED)
def test_every_installed_optimizer_trains(name, meta_prefix):
    net = model()
    lr = "1.0" if name.lower().startswith(("dadapt", "prodigy")) else "0.01"
    meta, opt = create_optimizer(net.parameters(), parse("--optimizer_type", name, "--learning_rate", lr))
    assert meta.startswith(meta_prefix), meta
    before = [p.detach().clone() for p in net.parameters()]
    optimizer_train_eval(opt, True)
    train_steps(opt, net, 8)  # RAdam variants skip the first steps
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))


def test_defaults_and_legacy_flags():
    a = parse()
    assert a.optimizer_type == "" and a.learning_rate == 2.0e-6 and a.max_grad_norm == 1.0
    assert resolve_optimizer_type(a) == "AdamW"
    assert resolve_optimizer_type(parse("--use_lion_optimizer")) == "Lion"
    assert resolve_optimizer_type(parse("--use_8bit_adam")) == "AdamW8bit"
    with pytest.raises(UserError, match="conflicts with --optimizer_type"):
        resolve_optimizer_type(parse("--use_8bit_adam", "--optimizer_type", "Lion"))
    with pytest.raises(UserError, match="cannot be used together"):
        resolve_optimizer_type(parse("--use_8bit_adam", "--use_lion_optimizer"))


def test_optimizer_args_are_typed():
    kw = parse_optimizer_args(["weight_decay=0.01", "betas=0.9,0.999", "foreach=False", "amsgrad=true",
                               "eps=1e-8", "mode='max'", "name=cosine", "expr='a=b'", "n = 3", "none=None"])
    assert kw == {"weight_decay": 0.01, "betas": (0.9, 0.999), "foreach": False, "amsgrad": True, "eps": 1e-8,
                  "mode": "max", "name": "cosine", "expr": "a=b", "n": 3, "none": None}
    net = model()
    meta, opt = create_optimizer(net.parameters(), parse("--optimizer_args", "weight_decay=0.05", "betas=.8,.9"))
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert meta == "torch.optim.adamw.AdamW(weight_decay=0.05,betas=(0.8, 0.9))"
    assert opt.param_groups[0]["lr"] == 2.0e-6


@pytest.mark.parametrize("item, fragment", [
    ("weight_decay", "not key=value"),
    ("betas=(0.9,", "betas=(0.9,"),
    ("=3", "not key=value"),
])
def test_bad_optimizer_args_name_the_item(item, fragment):
    with pytest.raises(UserError) as err:
        parse_optimizer_args([item])
    assert fragment in err.value.message


def test_unknown_argument_is_user_error():
    with pytest.raises(UserError, match="rejected the arguments"):
        create_optimizer(model().parameters(), parse("--optimizer_args", "not_an_option=1"))


@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW8bit", "Lion8bit", "PagedLion8bit", "SGDNesterov8bit"])
def test_missing_package_gives_install_hint(name, hide_module):
    hide_module("bitsandbytes")  # pinned, so installed in CI: a machine without it is simulated
    with pytest.raises(UserError) as err:
        create_optimizer(model().parameters(), parse("--optimizer_type", name))
    assert "pip install bitsandbytes==" in err.value.message
    with pytest.raises(UserError, match="pip install bitsandbytes=="):
        validate_optimizer_args(parse("--use_8bit_adam"))


def test_dotted_missing_module_and_unknown_names():
    with pytest.raises(UserError, match="pip install pytorch-optimizer==3.9.0"):
        create_optimizer(model().parameters(), parse("--optimizer_type", "pytorch_optimizer.CAME"))
    with pytest.raises(UserError, match="has no class"):
        create_optimizer(model().parameters(), parse("--optimizer_type", "torch.optim.NoSuchThing"))
    with pytest.raises(UserError, match="did you mean .*AdamW"):
        create_optimizer(model().parameters(), parse("--optimizer_type", "AdamWW"))


def test_param_groups_keep_their_lrs():
    net = model()
    groups = [{"params": list(net[0].parameters()), "lr": 1e-3}, {"params": list(net[2].parameters()), "lr": 1e-4}]
    _, opt = create_optimizer(groups, parse("--learning_rate", "5e-5"))
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4]


def test_adafactor_relative_step_reported_not_mutated():
    args = parse("--optimizer_type", "AdaFactor", "--learning_rate", "1e-3")
    net = model()
    groups = [{"params": list(net.parameters()), "lr": 1e-3}]
    meta, opt = create_optimizer(groups, args)
    assert uses_relative_step(opt) and args.learning_rate == 1e-3
    assert meta == "transformers.optimization.Adafactor(relative_step=True)"
    args = parse("--optimizer_type", "adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
                 "--learning_rate", "1e-3")
    _, opt = create_optimizer(model().parameters(), args)
    assert not uses_relative_step(opt) and opt.param_groups[0]["lr"] == 1e-3
    _, plain = create_optimizer(model().parameters(), parse())
    assert not uses_relative_step(plain)


def test_schedule_free_train_eval_switches_weights():
    net = model()
    _, opt = create_optimizer(net.parameters(), parse("--optimizer_type", "AdamWScheduleFree", "--learning_rate",
                                                      "0.05"))
    assert is_schedule_free(opt)
    optimizer_train_eval(opt, True)
    train_steps(opt, net, 5)
    train_w = net[0].weight.detach().clone()
    optimizer_train_eval(opt, False)
    assert not torch.equal(train_w, net[0].weight)
    optimizer_train_eval(opt, True)
    assert torch.allclose(train_w, net[0].weight, atol=1e-6)
    _, adamw = create_optimizer(model().parameters(), parse())
    assert not is_schedule_free(adamw)
    optimizer_train_eval(adamw, False)


def test_validate_fused_backward_pass():
    with pytest.raises(UserError, match="only with --optimizer_type AdaFactor"):
        validate_optimizer_args(parse("--fused_backward_pass"))
    args = parse("--fused_backward_pass", "--optimizer_type", "adafactor")
    validate_optimizer_args(args)
    args.gradient_accumulation_steps = 4
    with pytest.raises(UserError, match="gradient_accumulation_steps"):
        validate_optimizer_args(args)


def test_validate_reports_all_problems():
    with pytest.raises(UserError) as err:
        validate_optimizer_args(parse("--optimizer_type", "Nope", "--optimizer_args", "x", "--max_grad_norm", "-1"))
    assert "3 problems" in err.value.message


def test_unknown_argument_is_refused_before_creation():
    with pytest.raises(UserError, match="did you mean weight_decay") as err:
        validate_optimizer_args(parse("--optimizer_args", "weight_decayy=0.1", "betas=0.9,0.99"))
    assert "no argument 'betas'" not in err.value.message
    validate_optimizer_args(parse("--optimizer_type", "Prodigy", "--optimizer_args", "d_coef=2",
                                  "safeguard_warmup=True"))
