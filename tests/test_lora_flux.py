"""FLUX.1 LoRA: sd-scripts' module names and fused shapes, the shared-down parameterisation over diffusers' split
layers, save/load/merge, network_args, and diffusers' loader applying our files with the same math."""

from __future__ import annotations

import re

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel

from library.errors import UserError
from library.models.flux.conversion import FluxArchitecture, bfl_to_diffusers, diffusers_to_bfl
from library.models.flux.tiny import TinyFluxConfig, build_tiny_flux, save_tiny_flux_diffusers
from networks import lora_flux


@pytest.fixture(scope="module")
def parts():
    return build_tiny_flux(TinyFluxConfig(), seed=2)


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, 16, 64, generator=g), encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
        pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.3, 0.8]),
        img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5, 3.5]),
    )


def _randomize_up(network, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.all_loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.05)


def _expected_names(bfl_shapes: dict) -> dict[str, tuple]:
    """sd-scripts' rule: every Linear weight inside a double/single block, named lora_unet_<BFL path>."""
    out = {}
    for key, shape in bfl_shapes.items():
        if re.match(r"(double|single)_blocks\.\d+\.", key) and key.endswith(".weight") and len(shape) == 2:
            out["lora_unet_" + key[: -len(".weight")].replace(".", "_")] = tuple(shape)
    return out


def _module_shapes(network) -> dict[str, tuple]:
    sd = network.state_dict()
    return {lora.lora_name: (sd[f"{lora.lora_name}.lora_up.weight"].shape[0],
                             sd[f"{lora.lora_name}.lora_down.weight"].shape[1]) for lora in network.unet_loras}


def test_tiny_names_and_fused_shapes_follow_sd_scripts(parts):
    net = lora_flux.create_network(1.0, 4, 1.0, None, [parts["clip_l"], parts["t5"]], parts["transformer"])
    bfl = diffusers_to_bfl(parts["transformer"].state_dict(), TinyFluxConfig().architecture())
    expected = _expected_names({k: tuple(v.shape) for k, v in bfl.items()})
    assert _module_shapes(net) == expected
    assert len(net.unet_loras) == 2 * 10 + 2 * 3
    te = {lora.lora_name for lora in net.text_encoder_loras}
    assert len(te) == 2 * 6 and all(n.startswith("lora_te1_text_model_encoder_layers_") for n in te)
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2" in te


def test_full_size_flux_dev_has_sd_scripts_304_plus_72_modules():
    with init_empty_weights():
        transformer = FluxTransformer2DModel(guidance_embeds=True)
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, projection_dim=768))
    net = lora_flux.create_network(1.0, 2, 1.0, None, [clip, None], transformer)
    arch = FluxArchitecture.from_diffusers_config(transformer.config)
    bfl_shapes = {k: tuple(v.shape) for k, v in diffusers_to_bfl(transformer.state_dict(), arch).items()}
    shapes = _module_shapes(net)
    assert len(shapes) == 304 and shapes == _expected_names(bfl_shapes)
    assert shapes["lora_unet_double_blocks_0_img_attn_qkv"] == (9216, 3072)
    assert shapes["lora_unet_double_blocks_18_txt_mod_lin"] == (18432, 3072)
    assert shapes["lora_unet_single_blocks_37_linear1"] == (21504, 3072)
    assert shapes["lora_unet_single_blocks_0_linear2"] == (3072, 15360)
    assert len(net.text_encoder_loras) == 72
    with_in = lora_flux.create_network(1.0, 2, 1.0, None, None, transformer, in_dims="[2,2,2,2,2]")
    embedders = {lora.lora_name for lora in with_in.unet_loras} - set(shapes)
    assert embedders == {"lora_unet_img_in", "lora_unet_txt_in"} | {
        f"lora_unet_{p}_in_{s}_layer" for p in ("time", "vector", "guidance") for s in ("in", "out")}


def test_shared_down_on_split_layers_equals_the_fused_lora(parts):
    """Applying our network to diffusers' split layers == adding scale * up @ down to the BFL fused weights."""
    transformer = parts["transformer"]
    arch = TinyFluxConfig().architecture()
    with torch.no_grad():
        base = transformer(**_inputs()).sample
    net = lora_flux.create_network(1.0, 4, 2.0, None, None, transformer)
    _randomize_up(net)
    net.apply_to(None, transformer, apply_text_encoder=False)
    try:
        with torch.no_grad():
            applied = transformer(**_inputs()).sample
    finally:
        for lora in net.unet_loras:  # restore the shared fixture's forwards
            for module, forward in zip(lora.org_modules, lora.org_forwards):
                module.forward = forward
    bfl = {k: v.clone() for k, v in diffusers_to_bfl(transformer.state_dict(), arch).items()}
    sd = net.state_dict()
    for lora in net.unet_loras:
        key = lora.lora_name[len("lora_unet_"):]
        for block in ("double_blocks", "single_blocks"):
            key = re.sub(rf"^{block}_(\d+)_", rf"{block}.\1.", key)
        key = re.sub(r"_(attn|mlp|mod)_(qkv|proj|0|2|lin)$", r"_\1.\2", key).replace("modulation_lin", "modulation.lin")
        up, down = sd[f"{lora.lora_name}.lora_up.weight"], sd[f"{lora.lora_name}.lora_down.weight"]
        bfl[key + ".weight"] += up @ down * (2.0 / 4)
    fused = FluxTransformer2DModel(**arch.diffusers_config())
    fused.load_state_dict(bfl_to_diffusers(bfl), strict=True)
    with torch.no_grad():
        expected = fused(**_inputs()).sample
    assert (applied - base).abs().max() > 1e-3
    torch.testing.assert_close(applied, expected, rtol=1e-4, atol=1e-5)


def test_save_load_merge_round_trip(parts, tmp_path):
    transformer = FluxTransformer2DModel(**TinyFluxConfig().architecture().diffusers_config())
    transformer.load_state_dict(parts["transformer"].state_dict())
    net = lora_flux.create_network(1.0, 4, 1.0, None, [parts["clip_l"]], transformer, img_attn_dim=8)
    _randomize_up(net, seed=5)
    path = tmp_path / "flux_lora.safetensors"
    net.save_weights(path, torch.float32, {"ss_network_module": "networks.lora_flux"})
    loaded, weights = lora_flux.create_network_from_weights(1.0, path, None, [parts["clip_l"]], transformer)
    assert {lora.lora_name: lora.lora_dim for lora in loaded.all_loras()} == {
        lora.lora_name: lora.lora_dim for lora in net.all_loras()}
    assert loaded.state_dict()["lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight"].shape == (192, 8)
    loaded.load_weights(path)
    loaded.apply_to(None, transformer, apply_text_encoder=False)
    with torch.no_grad():
        applied = transformer(**_inputs(1)).sample
    merged = FluxTransformer2DModel(**TinyFluxConfig().architecture().diffusers_config())
    merged.load_state_dict(parts["transformer"].state_dict())
    unet_only = {k: v for k, v in weights.items() if k.startswith("lora_unet")}
    fresh, _ = lora_flux.create_network_from_weights(1.0, None, None, None, merged, weights_sd=unet_only)
    fresh.merge_to(None, merged, unet_only)
    with torch.no_grad():
        torch.testing.assert_close(merged(**_inputs(1)).sample, applied, rtol=1e-4, atol=1e-5)


def test_network_args(parts):
    t = parts["transformer"]

    def names(**kw):
        net = lora_flux.create_network(1.0, 4, 1.0, None, [parts["clip_l"], parts["t5"]], t, **kw)
        return {lora.lora_name for lora in net.all_loras()}

    assert not any("img_attn" in n for n in names(img_attn_dim="0"))
    single = names(train_blocks="single")
    assert not any("double_blocks" in n for n in single) and "lora_unet_single_blocks_1_linear1" in single
    picked = names(train_double_block_indices="1", train_single_block_indices="none")
    assert {n for n in picked if n.startswith("lora_unet")} == {f"lora_unet_double_blocks_1_{s}" for s, _ in
                                                                 lora_flux.DOUBLE_TARGETS}
    t5 = {n for n in names(train_t5xxl="True") if n.startswith("lora_te3_")}
    assert len(t5) == 2 * 7 and "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in t5
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_1" in t5
    with pytest.raises(UserError, match="did you mean 'img_attn_dim'"):
        names(img_atn_dim="4")
    with pytest.raises(UserError, match="expected True or False"):
        names(split_qkv="yes")
    with pytest.raises(UserError, match="not a valid regular expression"):
        names(network_reg_dims="single_blocks_(=8")
    with pytest.raises(UserError, match="outside 0..1"):
        names(train_double_block_indices="0-5")


def test_optimizer_groups_split_clip_and_t5_learning_rates(parts):
    net = lora_flux.create_network(1.0, 4, 1.0, None, [parts["clip_l"], parts["t5"]], parts["transformer"],
                                   train_t5xxl="True", loraplus_unet_lr_ratio="4")
    groups, names = net.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-3)
    assert names == ["textencoder1", "textencoder3", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == [1e-5, 2e-5, 1e-4, 4e-4]
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == sum(p.numel() for p in net.parameters())


def test_diffusers_flux_pipeline_applies_our_file_with_the_same_math(parts, tmp_path):
    """diffusers 0.42's kohya-FLUX converter hard-codes FLUX.1's single-block widths, so the tiny check covers
    double blocks and CLIP-L; single blocks are checked on full-size shapes below."""
    folder = save_tiny_flux_diffusers(tmp_path / "model", seed=4)
    pipe = FluxPipeline.from_pretrained(folder)
    ours = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    clip = CLIPTextModel.from_pretrained(folder / "text_encoder")
    net = lora_flux.create_network(1.0, 4, 2.0, None, [clip], ours, train_blocks="double")
    _randomize_up(net, seed=7)
    path = tmp_path / "double.safetensors"
    net.save_weights(path, None, {})
    pipe.load_lora_weights(str(path))
    net.apply_to([clip], ours)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 5])
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**_inputs(2)).sample, ours(**_inputs(2)).sample,
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pipe.text_encoder(ids).pooler_output, clip(ids).pooler_output,
                                   rtol=1e-4, atol=1e-5)


def test_diffusers_converter_splits_full_size_fused_modules_like_our_adapter():
    with init_empty_weights():
        transformer = FluxTransformer2DModel(guidance_embeds=True)
    net = lora_flux.create_network(1.0, 2, 1.0, None, None, transformer,
                                   train_double_block_indices="0", train_single_block_indices="0,37")
    _randomize_up(net, seed=1)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    converted = FluxPipeline.lora_state_dict(dict(sd))
    probe = torch.randn(15360, generator=torch.Generator().manual_seed(0))  # compare B @ A on a random vector
    for lora in net.unet_loras:
        prefix = lora.lora_name
        up, down = sd[f"{prefix}.lora_up.weight"], sd[f"{prefix}.lora_down.weight"]
        expected = up @ (down @ probe[: down.shape[1]]) * lora.scale
        block = re.match(r"lora_unet_(double|single)_blocks_(\d+)_(.*)", prefix)
        root = "transformer_blocks" if block.group(1) == "double" else "single_transformer_blocks"
        targets = dict(lora_flux.DOUBLE_TARGETS if block.group(1) == "double" else lora_flux.SINGLE_TARGETS)
        row = 0
        for part, size in zip(targets[block.group(3)], lora.sizes):
            key = f"transformer.{root}.{block.group(2)}.{part}"
            a, b = converted[f"{key}.lora_A.weight"], converted[f"{key}.lora_B.weight"]
            torch.testing.assert_close(b @ (a @ probe[: a.shape[1]]), expected[row:row + size], rtol=1e-5, atol=1e-6)
            row += size
    assert len([k for k in converted if k.endswith("lora_A.weight")]) == (8 + 2 * 3) + 2 * (2 + 4)


def test_split_qkv_trains_separate_loras_saved_as_a_fused_file_of_rank_n_r():
    fresh = build_tiny_flux(TinyFluxConfig(), seed=3)
    t = fresh["transformer"]
    net = lora_flux.create_network(1.0, 2, 1.0, None, [], t, split_qkv="True")
    net.apply_to([], t, False, True)
    sd = net.state_dict()
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (6, 64)
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (192, 6)
    assert float(sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 3.0  # scale stays alpha / r = 1 / 2
    assert sd["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (8, 64)  # q, k, v, mlp
    assert sd["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"].shape == (2, 64)  # not fused: rank r
    loss = t(**_inputs()).sample.square().mean()
    loss.backward()
    lora = net.unet_loras[[m.lora_name for m in net.unet_loras].index("lora_unet_single_blocks_0_linear1")]
    grad = lora.lora_up.weight.grad
    for part, size in enumerate(lora.sizes):
        rows = lora._rows(part)
        outside = torch.ones(grad.shape[1], dtype=torch.bool)
        outside[part * 2:(part + 1) * 2] = False
        assert grad[rows][:, ~outside].abs().sum() > 0 and grad[rows][:, outside].abs().sum() == 0
    # a trained split LoRA (block-diagonal up) applied as a plain fused file gives the same outputs
    with torch.no_grad():
        for m in net.unet_loras:
            for part in range(len(m.sizes)):
                cols = slice(None) if m.split_rank is None else slice(part * 2, (part + 1) * 2)
                m.lora_up.weight[m._rows(part), cols] = torch.randn_like(m.lora_up.weight[m._rows(part), cols]) * 0.1
        split_out = t(**_inputs(1)).sample
    other = build_tiny_flux(TinyFluxConfig(), seed=3)["transformer"]
    loaded, weights = lora_flux.create_network_from_weights(1.0, None, None, [], other, weights_sd=net.state_dict())
    loaded.apply_to([], other, False, True)
    loaded.load_state_dict(weights)
    assert all(m.split_rank is None for m in loaded.unet_loras)
    with torch.no_grad():
        torch.testing.assert_close(other(**_inputs(1)).sample, split_out, rtol=1e-5, atol=1e-6)


def test_network_reg_dims_and_lrs(parts):
    net = lora_flux.create_network(1.0, 4, 1.0, None, [parts["clip_l"], None], parts["transformer"],
                                   network_reg_dims="single_blocks_\\d+_linear1=8,te1_.*_mlp_fc1=2",
                                   img_attn_dim="6", network_reg_lrs="double_blocks_1_=1e-5,te1_=3e-5")
    ranks = {m.lora_name: m.lora_dim for m in net.all_loras()}
    assert ranks["lora_unet_single_blocks_1_linear1"] == 8 and ranks["lora_unet_single_blocks_1_linear2"] == 4
    assert ranks["lora_unet_double_blocks_0_img_attn_qkv"] == 6  # per-type rank where no regex matches
    assert ranks["lora_te1_text_model_encoder_layers_0_mlp_fc1"] == 2
    assert ranks["lora_te1_text_model_encoder_layers_0_mlp_fc2"] == 4
    groups, names = net.prepare_optimizer_params(None, 1e-4, 1e-3)
    assert names == ["reg_lr_1", "reg_lr_0", "unet"] and [g["lr"] for g in groups] == [3e-5, 1e-5, 1e-4]
    double1 = {id(p) for m in net.unet_loras if m.lora_name.startswith("lora_unet_double_blocks_1_")
               for p in m.parameters()}
    assert {id(p) for p in groups[1]["params"]} == double1
