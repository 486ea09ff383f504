"""FLUX.1 transformer weights: BFL single-file layout <-> diffusers, architecture read from shapes."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from library.models.flux.conversion import (
    COMFY_PREFIX, FluxArchitecture, bfl_to_diffusers, diffusers_to_bfl, layout_of, read_architecture,
)
from library.models.flux.tiny import TinyFluxConfig, build_tiny_flux


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_flux(TinyFluxConfig(), seed=1)["transformer"]


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def test_round_trip_is_bit_exact_both_ways(tiny):
    arch = TinyFluxConfig().architecture()
    dif = tiny.state_dict()
    bfl = diffusers_to_bfl(dif, arch)
    assert read_architecture(_shapes(bfl)) == arch
    back = bfl_to_diffusers(bfl)
    assert set(back) == set(dif)
    assert all(torch.equal(back[k], dif[k]) for k in dif)
    again = diffusers_to_bfl(back, arch)
    assert set(again) == set(bfl) and all(torch.equal(again[k], bfl[k]) for k in bfl)
    # fused layers hold the split layers' rows in q, k, v(, mlp) order; the final modulation is (shift, scale)
    qkv = bfl["double_blocks.1.img_attn.qkv.weight"]
    assert torch.equal(qkv[arch.hidden_size:2 * arch.hidden_size], dif["transformer_blocks.1.attn.to_k.weight"])
    lin1 = bfl["single_blocks.0.linear1.weight"]
    assert lin1.shape[0] == 3 * arch.hidden_size + arch.mlp_hidden
    assert torch.equal(lin1[3 * arch.hidden_size:], dif["single_transformer_blocks.0.proj_mlp.weight"])
    mod = bfl["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(mod[: arch.hidden_size], dif["norm_out.linear.weight"][arch.hidden_size:])


def test_converted_weights_give_the_same_outputs(tiny):
    arch = TinyFluxConfig().architecture()
    bfl = diffusers_to_bfl(tiny.state_dict(), arch)
    model = FluxTransformer2DModel(**read_architecture(_shapes(bfl)).diffusers_config())
    model.load_state_dict(bfl_to_diffusers(bfl), strict=True)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]),
    )
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, tiny(**inputs).sample)


def test_dev_and_schnell_told_apart_and_comfy_prefix(tiny):
    dev = diffusers_to_bfl(tiny.state_dict(), TinyFluxConfig().architecture())
    assert read_architecture(_shapes(dev)).variant == "dev"
    schnell_model = build_tiny_flux(TinyFluxConfig(guidance=False))["transformer"]
    schnell = diffusers_to_bfl(schnell_model.state_dict(), TinyFluxConfig(guidance=False).architecture())
    assert not any(k.startswith("guidance_in") for k in schnell)
    assert read_architecture(_shapes(schnell)).variant == "schnell"
    comfy = {COMFY_PREFIX + k: v for k, v in dev.items()}
    assert layout_of(comfy) == "bfl" and layout_of(tiny.state_dict()) == "diffusers"
    assert layout_of(["model.diffusion_model.input_blocks.0.0.weight"]) is None
    assert set(bfl_to_diffusers(comfy)) == set(tiny.state_dict())


def test_fp8_stored_weights_convert_without_changing_bits(tiny):
    arch = TinyFluxConfig().architecture()
    bfl = {k: v.to(torch.float8_e4m3fn) for k, v in diffusers_to_bfl(tiny.state_dict(), arch).items()}
    back = diffusers_to_bfl(bfl_to_diffusers(bfl), arch)
    assert all(back[k].dtype == torch.float8_e4m3fn and torch.equal(back[k].view(torch.uint8), v.view(torch.uint8))
               for k, v in bfl.items())


def test_unexpected_or_missing_tensors_are_reported(tiny):
    bfl = diffusers_to_bfl(tiny.state_dict(), TinyFluxConfig().architecture())
    with pytest.raises(ValueError, match="unexpected"):
        bfl_to_diffusers({**bfl, "double_blocks.0.extra.weight": torch.zeros(1)})
    bfl.pop("single_blocks.1.linear2.bias")
    with pytest.raises(KeyError, match="single_blocks.1.linear2.bias"):
        bfl_to_diffusers(bfl)


@pytest.mark.parametrize("guidance", [True, False])
def test_full_size_names_and_shapes_on_meta_match_diffusers_converter(guidance):
    """FLUX.1 dev/schnell at full size (on meta): our BFL names equal what diffusers' single-file converter reads."""
    with init_empty_weights():
        model = FluxTransformer2DModel(guidance_embeds=guidance)
    dif = model.state_dict()
    arch = FluxArchitecture.from_diffusers_config(model.config)
    assert (arch.hidden_size, arch.depth, arch.depth_single, arch.axes_dims_rope) == (3072, 19, 38, (16, 56, 56))
    bfl = diffusers_to_bfl(dif, arch)
    assert read_architecture(_shapes(bfl)) == arch
    assert arch.variant == ("dev" if guidance else "schnell")
    assert _shapes(bfl)["single_blocks.37.linear1.weight"] == (21504, 3072)
    assert _shapes(bfl)["double_blocks.18.img_mod.lin.weight"] == (18432, 3072)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = bfl_to_diffusers(bfl)
    assert _shapes(theirs) == _shapes(ours) == _shapes(dif)
    assert len(bfl) == (780 if guidance else 776)
