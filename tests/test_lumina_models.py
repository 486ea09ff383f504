"""Lumina Image 2.0 models: the Next-DiT single file <-> diffusers conversion (against diffusers' own converter on
the full-size model, and output-equal on the tiny one), Gemma2 files and the offline tokenizer, text conditioning
with the system prompt, and the LoRA module set of sd-scripts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.models.lumina.conversion import diffusers_to_nextdit, layout_of, nextdit_to_diffusers, read_architecture
from library.models.lumina.tiny import build_tiny_lumina, save_tiny_lumina_diffusers, save_tiny_lumina_files

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lumina")
    paths = save_tiny_lumina_files(root / "single", seed=3)
    paths["diffusers"] = save_tiny_lumina_diffusers(root / "diffusers", seed=3)
    return paths


def _full_size():
    from diffusers import Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    with init_empty_weights():
        dit = Lumina2Transformer2DModel(cap_feat_dim=2304)
        gemma = Gemma2Model(Gemma2Config(head_dim=256, hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                                         num_hidden_layers=26, num_key_value_heads=4, vocab_size=256000))
    return dit, gemma


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    return dict(hidden_states=torch.randn(2, 16, 8, 8, generator=g), timestep=torch.tensor([0.3, 0.8]),
                encoder_hidden_states=torch.randn(2, 8, 32, generator=g), encoder_attention_mask=mask)


def test_full_size_keys_agree_with_diffusers_own_converter():
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    dit, _ = _full_size()
    state = dit.state_dict()
    single = diffusers_to_nextdit(state)
    arch = read_architecture({k: tuple(v.shape) for k, v in single.items()})
    assert (arch.hidden_size, arch.num_layers, arch.num_refiner_layers, arch.num_heads, arch.num_kv_heads,
            arch.ffn_hidden, arch.cap_feat_dim, arch.axes_dims) == (2304, 26, 2, 24, 8, 9216, 2304, (32, 32, 32))
    assert arch.diffusers_config()["multiple_of"] == 256 and layout_of(single) == "nextdit"
    assert single["layers.0.attention.qkv.weight"].shape == (2304 + 2 * 768, 2304) and "norm_final.weight" in single
    theirs = convert_lumina2_to_diffusers(dict(single))
    ours = nextdit_to_diffusers(single)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in state.items()}


def test_tiny_single_file_and_diffusers_folder_give_the_same_output(files):
    from diffusers import Lumina2Transformer2DModel

    from library.models.lumina.loading import load_transformer

    state = load_file(str(files["lumina"]))
    assert layout_of(state) == "nextdit" and "layers.0.attention.qkv.weight" in state
    back = diffusers_to_nextdit(nextdit_to_diffusers(state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    single = load_transformer(files["lumina"], torch.float32)
    comfy = files["lumina"].with_name("comfy.safetensors")
    save_file({"model.diffusion_model." + k: v for k, v in state.items()}, str(comfy))
    folder = Lumina2Transformer2DModel.from_pretrained(files["diffusers"] / "transformer")
    with torch.no_grad():
        a = single(**_inputs()).sample
        b = folder(**_inputs()).sample
        c = load_transformer(comfy, torch.float32)(**_inputs()).sample
    assert a.abs().mean() > 0.01 and torch.equal(a, b) and torch.equal(a, c)


def test_gemma2_file_and_folder_load_the_same_encoder(files):
    from library.models.lumina.gemma import gemma2_config, is_gemma2, load_gemma2
    from library.models.weights import safetensors_keys

    keys = safetensors_keys(files["gemma2"])
    assert is_gemma2(keys) and all(k.startswith("model.") for k in keys)
    config = gemma2_config({k: v.shape for k, v in load_file(str(files["gemma2"])).items()})
    sizes = (config.hidden_size, config.num_hidden_layers, config.head_dim, config.num_attention_heads)
    assert sizes == (32, 2, 256, 1)
    ids = torch.tensor([[2, 40, 41, 42, 0, 0]])
    mask = (ids != 0).long()
    a = load_gemma2(files["gemma2"], torch.float32)(ids, attention_mask=mask, output_hidden_states=True)
    b = load_gemma2(files["diffusers"] / "text_encoder", torch.float32)(ids, attention_mask=mask,
                                                                        output_hidden_states=True)
    assert torch.equal(a.hidden_states[-2], b.hidden_states[-2])


def test_gemma_tokenizer_is_found_offline_or_named(files, tmp_path):
    from library.models.lumina.gemma import load_gemma_tokenizer

    cached = load_gemma_tokenizer(None, None, str(files["tokenizer_cache_dir"]))
    folder = load_gemma_tokenizer(None, files["diffusers"], None)
    assert cached("a red cat").input_ids == folder("a red cat").input_ids
    assert cached("a red cat").input_ids[0] == cached.bos_token_id and cached.padding_side == "right"
    with pytest.raises(UserError) as err:
        load_gemma_tokenizer(None, None, str(tmp_path / "empty"))
    text = str(err.value)
    assert "google_gemma-2-2b" in text and "tokenizer.json" in text and str(tmp_path / "empty") in text


def test_text_conditioning_puts_the_system_prompt_in_front(files):
    from library.models.lumina.gemma import load_gemma2, load_gemma_tokenizer
    from library.models.lumina.text import LuminaTextEncoding, system_prefix

    tokenizer = load_gemma_tokenizer(None, None, str(files["tokenizer_cache_dir"]))
    gemma = load_gemma2(files["gemma2"], torch.float32)
    plain = LuminaTextEncoding(tokenizer, gemma, max_length=30, system_prompt="")
    system = LuminaTextEncoding(tokenizer, gemma, max_length=30, system_prompt="You are an assistant.")
    assert plain.max_length == 32 and system_prefix("S") == "S <Prompt Start> " and system_prefix("") == ""
    ids_plain, ids_system = plain.tokenize(["a red cat"]), system.tokenize(["a red cat"])
    assert ids_plain.shape == (1, 64) and ids_system[0, 32:].sum() > ids_plain[0, 32:].sum()
    assert tokenizer.decode(ids_system[0, :32], skip_special_tokens=True).startswith(
        "You are an assistant. <Prompt Start> a red cat")
    out = system.encode(ids_system)
    assert out["gemma2_hidden"].shape == (1, 32, 32) and torch.equal(out["gemma2_mask"], ids_system[:, 32:])
    assert plain.cache_settings != system.cache_settings and "You are an assistant." in system.cache_settings


def test_gemma2_option_refuses_a_t5_file_and_a_missing_ae(files, tmp_path):
    from library.models.families.registry import resolve_family

    t5 = tmp_path / "t5xxl.safetensors"
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4), "shared.weight": torch.zeros(8, 4)},
              str(t5))
    args = argparse.Namespace(pretrained_model_name_or_path=str(files["lumina"]), gemma2=str(t5), ae=None)
    with pytest.raises(UserError) as err:
        resolve_family(args, ("lumina",))
    text = str(err.value)
    assert "--gemma2" in text and "a T5 text encoder, not a Gemma2 text encoder" in text and "--ae is missing" in text
    folder = argparse.Namespace(pretrained_model_name_or_path=str(files["diffusers"]), gemma2=None, ae=None)
    assert resolve_family(folder, ("lumina",)).name == "lumina2"


def _lora_names(network) -> list[str]:
    return sorted(lora.lora_name for lora in network.all_loras())


def test_full_size_lora_modules_equal_sd_scripts_362():
    from networks import lora_lumina

    dit, gemma = _full_size()
    reference = json.loads((DATA / "lumina_lora_names_sd_scripts.json").read_text())
    network = lora_lumina.create_network(1.0, 4, 1.0, None, [gemma], dit)
    assert len(network.text_encoder_loras) == 182 and len(network.unet_loras) == 180
    assert _lora_names(network) == reference["default"]
    shapes = {lora.lora_name: (lora.lora_up.weight.shape[0], lora.lora_down.weight.shape[1])
              for lora in network.unet_loras}
    assert shapes["lora_unet_layers_0_attention_qkv"] == (3840, 2304)
    assert shapes["lora_unet_final_layer_linear"] == (64, 2304)
    embedders = lora_lumina.create_network(1.0, 4, 1.0, None, None, dit, embedder_dims="[2,2,2]")
    assert sorted(lora.lora_name for lora in embedders.unet_loras) == reference["embedder_dims_2_2_2_unet"]
    # mlp_dim sets the feed-forward ranks (a no-op in sd-scripts); attn_dim=0 leaves sd-scripts' 120
    assert len(lora_lumina.create_network(1.0, 4, 1.0, None, None, dit, mlp_dim="0").unet_loras) == 90
    assert len(lora_lumina.create_network(1.0, 4, 1.0, None, None, dit, attn_dim="0").unet_loras) == 120
    refiners = lora_lumina.create_network(1.0, 4, 1.0, None, None, dit, train_blocks="refiners")
    assert len(refiners.unet_loras) == 2 * 6 + 2 * 5


def test_network_args_are_checked():
    from networks.lora_lumina import parse_lumina_network_kwargs

    with pytest.raises(UserError, match="did you mean 'attn_dim'"):
        parse_lumina_network_kwargs({"atn_dim": "4"})
    with pytest.raises(UserError, match="split_qkv=True is not supported"):
        parse_lumina_network_kwargs({"split_qkv": "True"})
    with pytest.raises(UserError, match="expected 3 ranks"):
        parse_lumina_network_kwargs({"embedder_dims": "[1,2]"})
    with pytest.raises(UserError, match="train_blocks='single'"):
        parse_lumina_network_kwargs({"train_blocks": "single"})


def test_fused_lora_equals_merging_it_into_the_single_file_weights(tmp_path):
    from networks import lora_lumina

    parts = build_tiny_lumina(seed=4)
    dit = parts["transformer"]
    network = lora_lumina.create_network(1.0, 4, 2.0, None, None, dit, embedder_dims="[2,2,2]")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in network.all_loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.05)
    network.apply_to(None, dit, False, True)
    with torch.no_grad():
        trained = dit(**_inputs()).sample
    path = tmp_path / "lora.safetensors"
    network.save_weights(str(path), torch.float32, {})
    fresh = build_tiny_lumina(seed=4)["transformer"]
    single = diffusers_to_nextdit(fresh.state_dict())
    weights = load_file(str(path))
    # sd-scripts' rule: a module is named lora_unet_<single-file path>
    by_name = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k, v in single.items() if v.dim() == 2}
    for name in {k.split(".")[0] for k in weights}:
        down, up = weights[f"{name}.lora_down.weight"], weights[f"{name}.lora_up.weight"]
        key = by_name[name]
        single[key] = single[key] + float(weights[f"{name}.alpha"]) / down.shape[0] * up @ down
    merged = build_tiny_lumina(seed=4)["transformer"]
    merged.load_state_dict(nextdit_to_diffusers(single))
    with torch.no_grad():
        expected = merged(**_inputs()).sample
        base = fresh(**_inputs()).sample
    assert (trained - base).abs().max() > 1e-3
    torch.testing.assert_close(trained, expected, rtol=1e-4, atol=1e-5)
