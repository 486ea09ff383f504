"""The shared memory options on the tiny SD3 MMDiT and Lumina transformer: --blocks_to_swap with the blocks each
family names (run on CPU with poisoned offloaded weights: any use of a weight that is not on the "device" shows),
float8 storage (--fp8_base) of the transformers and their text encoders, CPU-offloaded checkpoints, and the swap
limits read from the model files before anything loads."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

from family_helpers import (assert_block_swap_keeps_the_fused_updates, assert_swap_repeats_the_plain_step,
                            loss_and_grads, random_lora)
from library.errors import UserError
from library.models.families.lumina import LuminaSpec
from library.models.families.sd3 import SD3Spec


def _sd3_model(depth: int = 4):
    from library.models.sd3.tiny import TinySD3Config, build_tiny_sd3

    return build_tiny_sd3(TinySD3Config(variant="5-medium", depth=depth), seed=3)["transformer"]


def _lumina_model(layers: int = 4):
    from library.models.lumina.tiny import TinyLuminaConfig, build_tiny_lumina

    return build_tiny_lumina(TinyLuminaConfig(layers=layers), seed=3)["transformer"]


def _sd3_forward(model, grad=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    cond = {"l_out": torch.randn(2, 77, 16, generator=g), "g_out": torch.randn(2, 77, 24, generator=g),
            "l_pooled": torch.randn(2, 16, generator=g), "g_pooled": torch.randn(2, 24, generator=g),
            "t5_out": torch.randn(2, 8, 48, generator=g)}
    noisy = torch.randn(2, 16, 8, 8, generator=g)
    with torch.set_grad_enabled(grad):
        return SD3Spec().forward(model, noisy, torch.tensor([300.0, 800.0]), cond, dtype)


def _lumina_forward(model, grad=True):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    cond = {"gemma2_hidden": torch.randn(2, 8, 32, generator=g), "gemma2_mask": mask}
    noisy = torch.randn(2, 16, 8, 8, generator=g)
    with torch.set_grad_enabled(grad):
        return LuminaSpec().forward(model, noisy, torch.tensor([300.0, 800.0]), cond, torch.float32)


FAMILIES = {
    "sd3": (_sd3_model, _sd3_forward, SD3Spec, "networks.lora_sd3"),
    "lumina": (_lumina_model, _lumina_forward, LuminaSpec, "networks.lora_lumina"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("count", [1, 2])
def test_block_swap_gives_the_same_lora_loss_and_gradients(family, count):
    from library.training.block_swap import BlockSwap

    build, forward, spec, module = FAMILIES[family]
    model = build()
    params = list(random_lora(model, module).parameters())
    model.enable_gradient_checkpointing()
    model.train()
    plain = loss_and_grads(forward, model, params)
    blocks, swapped = spec().swappable_blocks(model, count)
    assert swapped == list(range(4 - count, 4)) and len(blocks) == 4  # the last N main blocks, as sd-scripts
    swap = BlockSwap(blocks, swapped, "cpu", checkpointing=True, poison=True)
    assert all(torch.isnan(next(blocks[i].parameters())).all() for i in swapped)  # offloaded = poisoned
    assert_swap_repeats_the_plain_step(forward, model, params, swap, plain)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_swap_of_trained_blocks_keeps_the_fused_updates(family):
    """Full fine-tuning (sd3_train.py / lumina_train.py): each block is updated inside the backward pass while it
    is on the device, and the update reaches the host copy."""
    from library.training.block_swap import BlockSwap

    build, forward, spec, _ = FAMILIES[family]
    assert_block_swap_keeps_the_fused_updates(
        build(), forward, 0.05,
        lambda model: BlockSwap(*spec().swappable_blocks(model, 2), "cpu", checkpointing=True, poison=True))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp8_storage_takes_fewer_bytes_and_keeps_the_loss_close(family):
    from library.models.fp8 import FP8_DTYPE, to_fp8

    build, forward, _, module = FAMILIES[family]
    model = build(2).requires_grad_(False)
    reference = copy.deepcopy(model)
    reference_params = list(random_lora(reference, module).parameters())
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    count = to_fp8(model)  # before the LoRA wraps the layers, as training does
    after = sum(p.numel() * p.element_size() for p in model.parameters())
    params = list(random_lora(model, module).parameters())
    with torch.no_grad():
        for a, b in zip(params, reference_params):
            a.copy_(b)
    assert count > 10 and after < 0.5 * before
    assert sum(p.dtype == FP8_DTYPE for p in model.parameters()) >= count
    ref_loss = loss_and_grads(forward, reference, reference_params)[0]
    loss, grads = loss_and_grads(forward, model, params)
    assert abs(float(loss) - float(ref_loss)) < 0.05 * float(ref_loss)
    assert all(g.abs().sum() > 0 for g in grads)  # the LoRA on float8 layers gets gradients


def test_fp8_text_encoders_give_close_outputs():
    """--fp8_base also stores the frozen CLIP-L, CLIP-G, T5 and Gemma2 Linear weights in float8; the outputs the
    families read (CLIP's and Gemma2's penultimate hidden states, T5's last) stay within 10%."""
    from library.models.fp8 import to_fp8
    from library.models.lumina.tiny import TinyLuminaConfig, build_tiny_lumina
    from library.models.sd3.tiny import TinySD3Config, build_tiny_sd3

    parts = build_tiny_sd3(TinySD3Config(), seed=2)
    encoders = [(parts["clip_l"], -2), (parts["clip_g"], -2), (parts["t5"], -1),
                (build_tiny_lumina(TinyLuminaConfig(), seed=2)["gemma2"], -2)]
    ids = torch.randint(1, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    for encoder, layer in encoders:
        encoder.eval()
        with torch.no_grad():
            reference = encoder(ids, output_hidden_states=True).hidden_states[layer]
            assert to_fp8(encoder) > 0
            out = encoder(ids, output_hidden_states=True).hidden_states[layer]
        assert out.dtype == torch.float32 and (out - reference).norm() < 0.1 * reference.norm()


def test_sd3_cpu_offloaded_checkpoints_give_the_same_gradients():
    from library.training.memory import offloading_checkpoint

    grads = []
    for offload in (False, True):
        model = _sd3_model(2)
        model.enable_gradient_checkpointing(offloading_checkpoint(torch.device("cpu")) if offload else None)
        _sd3_forward(model).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_swap_limits_are_read_from_the_model_files(tmp_path):
    """sd-scripts swaps at most depth - 2 of SD3's joint blocks and of Lumina's main layers; the file headers
    (or diffusers configs) say the depth before anything loads."""
    from library.models.lumina.tiny import TinyLuminaConfig, save_tiny_lumina_diffusers, save_tiny_lumina_files
    from library.models.sd3.tiny import TinySD3Config, save_tiny_sd3_files
    from library.models.weights import safetensors_keys

    sd3 = save_tiny_sd3_files(tmp_path / "sd3", TinySD3Config(variant="5-large", depth=4))
    args = argparse.Namespace(clip_l=None, clip_g=None, t5xxl=None, vae=None, blocks_to_swap=2,
                              pos_emb_random_crop_rate=0.0, enable_scaled_pos_embed=False)
    keys = set(safetensors_keys(sd3["sd3"]))
    assert SD3Spec().family(args, sd3["sd3"], keys).base_model_version == "5-large"
    args.blocks_to_swap = 3
    with pytest.raises(UserError, match="--blocks_to_swap 3: this model has 4 joint blocks, and at most 2"):
        SD3Spec().family(args, sd3["sd3"], keys)

    lumina = save_tiny_lumina_files(tmp_path / "lumina", TinyLuminaConfig(layers=5))
    args = argparse.Namespace(gemma2=str(lumina["gemma2"]), ae=str(lumina["ae"]), blocks_to_swap=3)
    LuminaSpec().family(args, lumina["lumina"], set(safetensors_keys(lumina["lumina"])))
    args.blocks_to_swap = 4
    with pytest.raises(UserError, match="--blocks_to_swap 4: this model has 5 main layers, and at most 3"):
        LuminaSpec().family(args, lumina["lumina"], set(safetensors_keys(lumina["lumina"])))
    folder = save_tiny_lumina_diffusers(tmp_path / "folder", TinyLuminaConfig(layers=2))
    args = argparse.Namespace(gemma2=None, ae=None, blocks_to_swap=1)
    with pytest.raises(UserError, match="this model has 2 main layers, and at most 0"):
        LuminaSpec().family(args, folder, None)


def test_a_cast_after_the_swap_hooks_reaches_the_host_copies():
    """--full_bf16 with --blocks_to_swap: the trained weights are cast after the blocks were parked in host memory;
    the swapped blocks must then come back in bfloat16 too (not as their old float32 host copies)."""
    from library.models.weights import move_module
    from library.training.block_swap import BlockSwap

    model = _sd3_model()
    reference = move_module(copy.deepcopy(model), dtype=torch.bfloat16)
    swap = BlockSwap(*SD3Spec().swappable_blocks(model, 2), "cpu", checkpointing=False, poison=True)
    move_module(model, dtype=torch.bfloat16)
    swap.adopt_casts()
    assert all(host.dtype == torch.bfloat16 for i in swap.swapped for _, host, _ in swap.host[i])
    seen = []
    model.transformer_blocks[3].register_forward_pre_hook(
        lambda module, args: seen.append(module.attn.to_q.weight.dtype))
    with torch.no_grad():
        out = _sd3_forward(model, grad=False, dtype=torch.bfloat16)
        expected = _sd3_forward(reference, grad=False, dtype=torch.bfloat16)
    assert seen == [torch.bfloat16] and torch.equal(out, expected)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_place_denoiser_swaps_the_blocks_the_family_names(family):
    """The wiring training uses (``memory.place_denoiser`` through ``FamilySpec.swappable_blocks``)."""
    from types import SimpleNamespace

    from library.models.families.lumina import lumina_family
    from library.models.families.sd3 import sd3_family
    from library.training.memory import place_denoiser

    build, forward, _, _ = FAMILIES[family]
    model = build()
    reference = copy.deepcopy(model)
    models = SimpleNamespace(unet=model, family=sd3_family("5-medium") if family == "sd3" else lumina_family())
    args = argparse.Namespace(blocks_to_swap=2, gradient_checkpointing=True)
    swap = place_denoiser(models, args, torch.device("cpu"), torch.float32)
    blocks = model.transformer_blocks if family == "sd3" else model.layers
    assert swap.swapped == [2, 3] and swap.blocks == list(blocks) and swap.owns(next(blocks[3].parameters()))
    assert not swap.owns(next(blocks[1].parameters()))
    assert torch.equal(forward(model, grad=False), forward(reference, grad=False))
    swap.remove()
