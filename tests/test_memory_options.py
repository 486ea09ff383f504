"""Family-agnostic memory machinery on the tiny FLUX: --blocks_to_swap hooks (run on CPU with poisoned offloaded
weights, so any use of a weight that is not on the "device" shows), float8 storage (--fp8_base) and CPU-offloaded
checkpoints (--cpu_offload_checkpointing) give the results of the plain model."""

from __future__ import annotations

import pytest
import torch

from family_helpers import (assert_block_swap_keeps_the_fused_updates, assert_swap_repeats_the_plain_step,
                            loss_and_grads, random_lora)
from library.models.families.flux import FluxSpec


@pytest.fixture()
def tiny():
    from library.models.flux.tiny import build_tiny_flux

    torch.manual_seed(0)
    return build_tiny_flux()["transformer"]


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(2, 16, 8, 8, generator=g)
    cond = {"t5_out": torch.randn(2, 5, 32, generator=g), "l_pooled": torch.randn(2, 32, generator=g),
            "guidance": torch.full((2,), 3.5)}
    return noisy, torch.tensor([300.0, 800.0]), cond


def _forward(model, grad=True):
    noisy, t, cond = _inputs()
    with torch.set_grad_enabled(grad):
        return FluxSpec().forward(model, noisy, t, cond, torch.float32)


def _loss_and_grads(model, params, *, grad=True):
    return loss_and_grads(_forward, model, params, grad)


def _lora(model):
    return random_lora(model, "networks.lora_flux")


def _swap(model, swapped, *, checkpointing=True):
    from library.training.block_swap import BlockSwap

    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    return BlockSwap(blocks, swapped, "cpu", checkpointing=checkpointing, poison=True)


@pytest.mark.parametrize("swapped", [[1, 3], [0, 1, 2, 3], [3]])
def test_block_swap_gives_the_same_lora_loss_and_gradients(tiny, swapped):
    network = _lora(tiny)
    params = list(network.parameters())
    tiny.enable_gradient_checkpointing()
    tiny.train()
    plain = _loss_and_grads(tiny, params)
    swap = _swap(tiny, swapped)
    blocks = [*tiny.transformer_blocks, *tiny.single_transformer_blocks]
    assert all(torch.isnan(blocks[i].norm.linear.weight).all() if hasattr(blocks[i], "norm")
               else torch.isnan(blocks[i].norm1.linear.weight).all() for i in swapped)  # offloaded = poisoned
    assert_swap_repeats_the_plain_step(_forward, tiny, params, swap, plain)


def test_block_swap_of_trained_blocks_keeps_the_fused_updates(tiny):
    """Each parameter stepped inside backward (--fused_backward_pass), blocks 0 and 2 swapped."""
    assert_block_swap_keeps_the_fused_updates(tiny, _forward, 0.1, lambda model: _swap(model, [0, 2]))


def test_block_swap_without_checkpointing_keeps_training_blocks_until_backward(tiny):
    network = _lora(tiny)
    params = list(network.parameters())
    plain_loss, plain_grads = _loss_and_grads(tiny, params)
    swap = _swap(tiny, [1, 2], checkpointing=False)
    loss, grads = _loss_and_grads(tiny, params)
    assert torch.equal(loss, plain_loss) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    swap.release_all()


def test_fp8_storage_is_close_to_the_model_and_lora_still_trains(tiny):
    from library.models.fp8 import Fp8Linear, to_fp8

    import copy

    tiny.requires_grad_(False)  # the frozen base
    reference_model = copy.deepcopy(tiny)
    reference_params = list(_lora(reference_model).parameters())
    before = sum(p.numel() * p.element_size() for p in tiny.parameters())
    count = to_fp8(tiny)  # before the LoRA wraps the layers, as training does
    after = sum(p.numel() * p.element_size() for p in tiny.parameters())
    network = _lora(tiny)
    params = list(network.parameters())
    with torch.no_grad():
        for a, b in zip(params, reference_params):
            a.copy_(b)
    reference = _loss_and_grads(reference_model, reference_params)[0]
    assert count > 20 and after < 0.45 * before
    assert isinstance(tiny.transformer_blocks[0].attn.to_q, Fp8Linear)
    assert tiny.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    loss, grads = _loss_and_grads(tiny, params)
    assert abs(float(loss) - float(reference)) < 0.05 * float(reference)
    assert all(g.abs().sum() > 0 for g in grads)
    optimizer = torch.optim.SGD(params, lr=1.0)
    for _ in range(3):
        noisy, t, cond = _inputs()
        out = FluxSpec().forward(tiny, noisy, t, cond, torch.float32)
        loss_step = out.float().square().mean()
        optimizer.zero_grad()
        loss_step.backward()
        optimizer.step()
    assert float(loss_step.detach()) < float(loss)


def test_cpu_offloaded_checkpoints_give_the_same_gradients(tiny):
    from library.training.memory import offloading_checkpoint

    network = _lora(tiny)
    params = list(network.parameters())
    tiny.enable_gradient_checkpointing()
    plain = _loss_and_grads(tiny, params)
    tiny.enable_gradient_checkpointing(offloading_checkpoint(torch.device("cpu")))
    loss, grads = _loss_and_grads(tiny, params)
    assert torch.equal(loss, plain[0]) and all(torch.equal(a, b) for a, b in zip(grads, plain[1]))


def test_blocks_to_swap_is_checked_against_the_model_file_before_it_loads(tmp_path):
    import argparse

    from library.errors import UserError
    from library.models.families.flux import FluxSpec, swap_split
    from library.models.flux.tiny import save_tiny_flux_files
    from library.models.weights import safetensors_keys

    assert swap_split(8) == (4, 8) and swap_split(35) == (17, 36)  # sd-scripts' split
    files = save_tiny_flux_files(tmp_path / "tiny")
    keys = set(safetensors_keys(files["flux"]))
    args = argparse.Namespace(clip_l=str(files["clip_l"]), t5xxl=str(files["t5xxl"]), ae=str(files["ae"]),
                              guidance_scale=None, blocks_to_swap=2)
    FluxSpec().family(args, files["flux"], keys)  # 1 double + 2 single of 2 + 2: fine
    args.blocks_to_swap = 3
    with pytest.raises(UserError, match="swaps 1 double and 4 single blocks .* has 2 double and 2 single blocks; "
                                        "use at most 2"):
        FluxSpec().family(args, files["flux"], keys)


def test_fp8_t5_keeps_its_float32_modules_and_runs_without_autocast():
    from library.models.flux.tiny import build_tiny_flux
    from library.models.fp8 import to_fp8

    t5 = build_tiny_flux()["t5"].eval()
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = t5(ids).last_hidden_state
        count = to_fp8(t5)
        out = t5(ids).last_hidden_state
    assert count > 0 and all(m.wo.weight.dtype == torch.float32 for m in t5.modules() if hasattr(m, "wo"))
    assert out.dtype == torch.float32 and (out - reference).norm() < 0.1 * reference.norm()
