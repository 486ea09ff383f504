"""Learning-rate curves at given steps for every scheduler, step parsing, multi-process counting, errors."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from library.errors import UserError
from library.training.optimizers import add_optimizer_arguments, create_optimizer, uses_relative_step
from library.training.schedulers import (
    add_scheduler_arguments, create_scheduler, parse_step_count, validate_scheduler_args,
)

LR = 1.0


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    add_scheduler_arguments(parser)
    return parser.parse_args(list(argv))


def lrs(args: argparse.Namespace, max_steps: int, num_processes: int = 1, steps: int | None = None) -> list[float]:
    """lr before each optimizer step (scheduler stepped num_processes times per step, like accelerate)."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=LR)
    sched = create_scheduler(opt, args, max_steps, num_processes=num_processes)
    out = []
    for _ in range(steps if steps is not None else max_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        for _ in range(num_processes):
            sched.step()
    return out


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("100", 100), ("1.0", 1), ("100.0", 100), ("0.1", 0.1), ("10%", 0.1), ("0%", 0.0), ("2.5%", 0.025),
])
def test_parse_step_count(text, value):
    got = parse_step_count(text)
    assert got == pytest.approx(value) and type(got) is type(value)


@pytest.mark.parametrize("text", ["abc", "-1", "100.5", "150%", "x%"])
def test_parse_step_count_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_step_count(text)


def test_defaults():
    a = parse()
    assert (a.lr_scheduler, a.lr_warmup_steps, a.lr_scheduler_num_cycles, a.lr_scheduler_power) == \
        ("constant", 0, 1, 1.0)
    assert lrs(a, 5) == [LR] * 5


def test_constant_with_warmup_ratio():
    curve = lrs(parse("--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "0.1"), 100)
    assert curve[0] == 0.0 and curve[5] == pytest.approx(0.5) and curve[10:] == [LR] * 90
    assert lrs(parse("--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "10%"), 100) == curve


def test_linear_and_cosine():
    lin = lrs(parse("--lr_scheduler", "linear", "--lr_warmup_steps", "10"), 110)
    assert lin[5] == pytest.approx(0.5) and lin[10] == pytest.approx(1.0) and lin[60] == pytest.approx(0.5)
    cos = lrs(parse("--lr_scheduler", "cosine", "--lr_warmup_steps", "10"), 110)
    for step in (10, 35, 60, 85, 109):
        progress = (step - 10) / 100
        assert cos[step] == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)), abs=1e-6)


def test_cosine_with_restarts_and_polynomial():
    cur = lrs(parse("--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "2"), 100)
    assert cur[0] == pytest.approx(1.0) and cur[50] == pytest.approx(1.0) and cur[25] == pytest.approx(0.5)
    poly = lrs(parse("--lr_scheduler", "polynomial", "--lr_scheduler_power", "2"), 100)
    lr_end = 1e-7
    assert poly[50] == pytest.approx((LR - lr_end) * 0.5**2 + lr_end)


def test_min_lr_inverse_sqrt_wsd_piecewise():
    cmin = lrs(parse("--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1"), 100, steps=101)
    assert cmin[100] == pytest.approx(0.1, abs=1e-6) and cmin[50] == pytest.approx(0.55, abs=1e-6)
    inv = lrs(parse("--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "4", "--lr_scheduler_timescale", "4"), 40)
    assert inv[4] == pytest.approx(1.0) and inv[36] == pytest.approx(1 / math.sqrt(36 / 4))
    wsd = lrs(parse("--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "10", "--lr_decay_steps", "0.2"),
              100, steps=101)
    assert wsd[5] == pytest.approx(0.5) and wsd[50] == 1.0 and wsd[100] == pytest.approx(0.0, abs=1e-6)
    pw = lrs(parse("--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules='1:10,0.1:20,0.01'"),
             30)
    assert pw[5] == 1.0 and pw[15] == pytest.approx(0.1) and pw[25] == pytest.approx(0.01)


def test_multi_process_counting_keeps_warmup_in_optimizer_steps():
    one = lrs(parse("--lr_scheduler", "linear", "--lr_warmup_steps", "10"), 100)
    two = lrs(parse("--lr_scheduler", "linear", "--lr_warmup_steps", "10"), 100, num_processes=2)
    assert one == pytest.approx(two)
    ratio = lrs(parse("--lr_scheduler", "cosine", "--lr_warmup_steps", "0.2"), 50, num_processes=4)
    assert ratio[10] == pytest.approx(1.0) and ratio[5] == pytest.approx(0.5)


def test_custom_scheduler_class():
    args = parse("--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler_args", "step_size=3",
                 "gamma=0.5")
    validate_scheduler_args(args)
    assert lrs(args, 9) == [1.0] * 3 + [0.5] * 3 + [0.25] * 3


def test_adafactor_schedule():
    args = parse("--optimizer_type", "AdaFactor", "--learning_rate", "1e-3")
    param = torch.nn.Parameter(torch.ones(4, 4))
    _, opt = create_optimizer([param], args)
    assert uses_relative_step(opt)
    sched = create_scheduler(opt, args, 10, adafactor_relative_step=True)
    assert sched.get_lr() == [1e-3]
    param.grad = torch.ones(4, 4)
    opt.step()
    sched.step()
    # relative step after one step: min(1e-2, 1/sqrt(1)) * max(1e-3, rms(param)=1) = 0.01, whatever --learning_rate
    assert sched.get_lr()[0] == pytest.approx(1e-2)
    with pytest.raises(UserError, match="relative_step=True"):
        create_scheduler(torch.optim.SGD([param], lr=1.0), parse("--lr_scheduler", "adafactor"), 10)


def test_schedule_free_gets_constant():
    param = torch.nn.Parameter(torch.zeros(1))
    _, opt = create_optimizer([param], parse("--optimizer_type", "AdamWScheduleFree", "--learning_rate", "0.5"))
    sched = create_scheduler(opt, parse("--lr_scheduler", "cosine"), 10)
    opt.train()
    for _ in range(5):
        param.grad = torch.ones(1)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("argv, fragment", [
    (["--lr_scheduler", "cosin"], "did you mean cosine"),
    (["--lr_warmup_steps", "10"], "constant_with_warmup"),
    (["--lr_scheduler", "piecewise_constant"], "step_rules"),
    (["--lr_scheduler_type", "torch.optim.lr_scheduler.Nope"], "has no class"),
    (["--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR", "--lr_warmup_steps", "3"], "--lr_scheduler_type"),
    (["--lr_scheduler", "linear", "--lr_scheduler_args", "bad"], "not key=value"),
])
def test_validation_errors(argv, fragment):
    with pytest.raises(UserError) as err:
        validate_scheduler_args(parse(*argv))
    assert fragment in err.value.message


def test_config_values_are_parsed_too():
    args = parse("--lr_scheduler", "linear")
    args.lr_warmup_steps = "1.0"  # e.g. from a config file
    validate_scheduler_args(args)
    assert lrs(args, 10)[1] == pytest.approx(1.0)
    args.lr_warmup_steps = "lots"
    with pytest.raises(UserError, match="--lr_warmup_steps"):
        validate_scheduler_args(args)
