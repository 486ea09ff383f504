"""Interop: our LoRA files load in diffusers (peft backend) with the same effect as our merge, and files laid out
as the kohya format documents load into ours with every key used."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import networks.lora as lora
from library.errors import UserError
from library.models.tiny import TinyConfig, build_tiny_components
from tests.test_lora_network import randomize_up, rel, run_models, tiny_models


@pytest.mark.parametrize("sd2,conv_dim", [(False, None), (False, "2"), (True, None), (True, "2")])
def test_diffusers_load_lora_weights_matches_our_merge(tmp_path, sd2, conv_dim):
    from diffusers import StableDiffusionPipeline

    parts = build_tiny_components(TinyConfig(sd2=sd2))  # SD2: linear proj_in/proj_out, OpenCLIP-shaped TE
    te, unet = parts["text_encoder"], parts["unet"]
    te_ours, unet_ours = copy.deepcopy(te), copy.deepcopy(unet)
    hidden_base, out_base = run_models(te, unet)

    kwargs = {} if conv_dim is None else {"conv_dim": conv_dim, "conv_alpha": "1"}
    network = lora.create_network(1.0, 4, 2, None, te_ours, unet_ours, **kwargs)
    randomize_up(network)
    path = tmp_path / "ours.safetensors"
    network.save_weights(str(path), None, {"ss_network_module": "networks.lora"})
    network.merge_to(te_ours, unet_ours, None, torch.float32, "cpu")
    hidden_ours, out_ours = run_models(te_ours, unet_ours)

    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=te, tokenizer=None, unet=unet, scheduler=parts["scheduler"],
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(path))
    hidden_diffusers, out_diffusers = run_models(pipe.text_encoder, pipe.unet)

    assert rel(hidden_ours, hidden_base) > 1e-2 and rel(out_ours, out_base) > 1e-2  # both parts have an effect
    assert rel(hidden_diffusers, hidden_ours) <= 1e-5
    assert rel(out_diffusers, out_ours) <= 1e-5


# The documented layout: lora_<unet|te>_<module path with "." -> "_">.{lora_down.weight, lora_up.weight, alpha}.
UNET_PATHS = [
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "up_blocks.3.attentions.1.proj_out",
    "up_blocks.1.resnets.0.conv1",  # 3x3 LoCon
    "down_blocks.1.downsamplers.0.conv",  # 3x3, stride 2
    "up_blocks.1.resnets.0.time_emb_proj",
]
TE_PATHS = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj", "encoder.layers.1.mlp.fc1"]


def kohya_file(te, unet, with_alpha: bool, rank: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    sd = {}
    for prefix, model, paths in (("lora_unet_", unet, UNET_PATHS), ("lora_te_text_model_", te, TE_PATHS)):
        for path in paths:
            module = model.get_submodule(path) if prefix == "lora_unet_" or hasattr(model, "encoder") else \
                model.text_model.get_submodule(path)
            name = prefix + path.replace(".", "_")
            if isinstance(module, torch.nn.Conv2d):
                kh, kw = module.kernel_size
                down = torch.randn(rank, module.in_channels, kh, kw, generator=gen) * 0.1
                up = torch.randn(module.out_channels, rank, 1, 1, generator=gen) * 0.1
            else:
                down = torch.randn(rank, module.in_features, generator=gen) * 0.1
                up = torch.randn(module.out_features, rank, generator=gen) * 0.1
            sd[f"{name}.lora_down.weight"] = down
            sd[f"{name}.lora_up.weight"] = up
            if with_alpha:
                sd[f"{name}.alpha"] = torch.tensor(1.5)
    return sd


@pytest.mark.parametrize("with_alpha", [True, False])
def test_kohya_layout_file_loads_and_merges(tmp_path, with_alpha):
    te, unet = tiny_models()
    sd = kohya_file(te, unet, with_alpha)
    path = tmp_path / "kohya.safetensors"
    save_file(sd, str(path))
    scale = 1.5 / 3 if with_alpha else 1.0  # files without alpha: alpha = rank

    network, weights = lora.create_network_from_weights(0.8, str(path), None, te, unet)
    network.load_weights(str(path))  # raises if any key is unused or missing
    assert set(weights) == set(sd)
    own = network.state_dict()
    assert set(own) == {k for k in sd} | {f"{n}.alpha" for n in {k.split(".")[0] for k in sd}}
    for key, value in sd.items():
        assert torch.equal(own[key], value)
    assert all(m.scale == pytest.approx(scale) for m in network.all_loras())

    originals = {p: unet.get_submodule(p).weight.detach().clone() for p in UNET_PATHS}
    conv = unet.get_submodule("down_blocks.1.downsamplers.0.conv")
    x = torch.randn(1, conv.in_channels, 16, 16)
    with torch.no_grad():
        expected_conv = torch.nn.functional.conv2d(x, originals["down_blocks.1.downsamplers.0.conv"], conv.bias, 2, 1)
        name = "lora_unet_down_blocks_1_downsamplers_0_conv"
        lx = torch.nn.functional.conv2d(x, sd[f"{name}.lora_down.weight"], None, 2, 1)
        expected_conv += torch.nn.functional.conv2d(lx, sd[f"{name}.lora_up.weight"]) * 0.8 * scale

    network.merge_to(te, unet, weights, torch.float32, "cpu")
    for path in UNET_PATHS:
        name = "lora_unet_" + path.replace(".", "_")
        down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
        merged = unet.get_submodule(path).weight.detach()
        if down.dim() == 2:
            assert torch.allclose(merged, originals[path] + 0.8 * scale * up @ down, atol=1e-6)
        elif down.shape[2:] == (1, 1):
            delta = (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
            assert torch.allclose(merged, originals[path] + 0.8 * scale * delta, atol=1e-6)
    with torch.no_grad():
        assert rel(conv(x), expected_conv) < 1e-5


def test_file_for_another_model_is_rejected(tmp_path):
    te, unet = tiny_models()
    sd = kohya_file(te, unet, True)
    sd["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"] = torch.zeros(3, 640)
    sd["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight"] = torch.zeros(640, 3)
    save_file(sd, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(UserError, match="input_blocks_4_1.*another model family"):
        lora.create_network_from_weights(1.0, str(tmp_path / "sdxl.safetensors"), None, te, unet)
    with pytest.raises(UserError, match="not a kohya-format LoRA"):
        lora.create_network_from_weights(1.0, None, None, te, unet, weights_sd={"foo": torch.zeros(1)})
