"""``--torch_compile`` / ``--dynamo_backend``: the denoiser compiled in place, the same training as without it,
and unusable backends refused before any model loads."""

from __future__ import annotations

import argparse

import pytest
import torch

from library.errors import UserError
from library.training.compile import compile_problems
from tests.train_helpers import dreambooth_dir, load_lora, prepare_run, run_main, train_args


def _args(**kwargs) -> argparse.Namespace:
    return argparse.Namespace(**{"torch_compile": True, "dynamo_backend": "inductor", **kwargs})


@pytest.mark.slow
def test_eager_backend_compiles_the_denoiser_and_trains_the_same_lora(tiny_sd1_dir, tmp_path):
    """dynamo's eager backend runs the captured graph op for op: the LoRA must equal the uncompiled run's bit for
    bit, which also shows the LoRA modules' forwards were traced (a graph without them would not train them)."""
    data = dreambooth_dir(tmp_path / "img", count=2)
    files = {}
    for name, extra in (("plain", []), ("compiled", ["--torch_compile", "--dynamo_backend", "eager"])):
        files[name] = run_main(train_args(tiny_sd1_dir, tmp_path / name, data=data, steps=3, extra=extra))
    plain, _ = load_lora(files["plain"])
    compiled, _ = load_lora(files["compiled"])
    assert plain.keys() == compiled.keys()
    ups = [k for k in plain if k.endswith("lora_up.weight")]
    assert any(plain[k].abs().max() > 0 for k in ups)  # the LoRA trained
    for key in plain:
        assert torch.equal(plain[key], compiled[key]), key


def test_the_denoiser_is_compiled_in_place_with_its_lora(tiny_sd1_dir, tmp_path):
    data = dreambooth_dir(tmp_path / "img", count=2)
    run = prepare_run(train_args(tiny_sd1_dir, tmp_path / "out", data=data, steps=1,
                                 extra=["--torch_compile", "--dynamo_backend", "eager"]))
    unet = run.models.unet
    assert unet._compiled_call_impl is not None
    assert not any("_orig_mod" in name for name in unet.state_dict())  # saving sees the same names


@pytest.mark.slow  # tracing the UNet takes about half a minute of CPU
def test_the_compiled_forward_holds_the_lora(tiny_sd1_dir, tmp_path):
    data = dreambooth_dir(tmp_path / "img", count=2)
    run = prepare_run(train_args(tiny_sd1_dir, tmp_path / "out", data=data, steps=1,
                                 extra=["--torch_compile", "--dynamo_backend", "eager"]))
    unet, lora = run.models.unet, run.recipe.network
    for module in lora.unet_loras:
        torch.nn.init.normal_(module.lora_up.weight, std=0.5)
    torch.manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 8, 8)
    t = torch.tensor([10])
    cond = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        compiled = unet(x, t, cond).sample  # __call__ runs the compiled forward
        eager = unet.forward(x, t, cond).sample
        lora.set_multiplier(0.0)
        without = unet.forward(x, t, cond).sample
    assert torch.equal(compiled, eager)
    assert not torch.allclose(compiled, without)  # the LoRA is inside the compiled graph


@pytest.mark.parametrize(("extra", "expected"), [
    ({"dynamo_backend": "ofi"}, "no longer part of PyTorch"),
    ({"dynamo_backend": "cudagraphs"}, "needs a CUDA GPU"),
    ({"dynamo_backend": "tvm"}, "needs the tvm package"),
    ({"blocks_to_swap": 4}, "cannot be combined with --blocks_to_swap"),
])
def test_unusable_settings_are_refused(extra, expected):
    problems = compile_problems(_args(**extra), cuda=False)
    assert len(problems) == 1 and expected in problems[0]


def test_no_problem_without_the_flag_or_with_a_usable_backend():
    assert compile_problems(_args(torch_compile=False, dynamo_backend="tvm"), cuda=False) == []
    assert compile_problems(_args(dynamo_backend="eager"), cuda=False) == []


def test_refusal_comes_with_the_other_checks(tiny_sd1_dir, tmp_path):
    data = dreambooth_dir(tmp_path / "img", count=1)
    with pytest.raises(UserError, match="--dynamo_backend cudagraphs needs a CUDA GPU"):
        run_main(train_args(tiny_sd1_dir, tmp_path / "out", data=data,
                            extra=["--torch_compile", "--dynamo_backend", "cudagraphs"]))
