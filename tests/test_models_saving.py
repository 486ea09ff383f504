"""save_sd_model: every format, SD1 and SD2, loads back bit for bit."""

from __future__ import annotations

import argparse
import json
import os
import stat

import pytest
import torch
from safetensors import safe_open

from library.models.loading import load_sd_models
from library.models.saving import save_dtype, save_sd_model
from tests.test_models_loading import assert_same_models, assert_same_weights

FORMATS = {
    "safetensors": "model.safetensors",
    "ckpt": "model.ckpt",
    "diffusers": "model_diffusers",
    "diffusers_safetensors": "model_diffusers_st",
}


@pytest.fixture(scope="module")
def loaded(tiny_sd1_dir, tiny_sd2_dir):
    return {
        False: load_sd_models(argparse.Namespace(pretrained_model_name_or_path=str(tiny_sd1_dir))),
        True: load_sd_models(argparse.Namespace(pretrained_model_name_or_path=str(tiny_sd2_dir), v2=True)),
    }


@pytest.mark.parametrize("sd2", [False, True])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_load_save_load_is_bit_exact(loaded, tmp_path, sd2, fmt, tiny_sd1_dir, tiny_sd2_dir):
    models = loaded[sd2]
    out = save_sd_model(tmp_path / FORMATS[fmt], models, fmt=fmt)
    tokenizers = str(tiny_sd2_dir if sd2 else tiny_sd1_dir)
    again = load_sd_models(
        argparse.Namespace(pretrained_model_name_or_path=str(out), v2=sd2, tokenizer_cache_dir=tokenizers)
    )
    assert_same_models(models, again)
    assert again.text_encoders[0].config.num_attention_heads == models.text_encoders[0].config.num_attention_heads
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary leftovers
    if fmt.startswith("diffusers"):
        names = {p.name for p in out.iterdir()}
        assert names == {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"}
        suffix = ".safetensors" if fmt == "diffusers_safetensors" else ".bin"
        assert (out / "unet" / f"diffusion_pytorch_model{suffix}").is_file()
        assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in (out / "tokenizer").iterdir()}
        scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler["prediction_type"] == "epsilon" and scheduler["beta_schedule"] == "scaled_linear"
        probe = tmp_path / "probe"
        probe.mkdir()  # the mode any folder the user makes gets (umask applied), not mkdtemp's private 0700
        assert out.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777
        probe.rmdir()
    else:
        assert again.model_hashes["legacy"] and len(again.model_hashes["sha256"]) == 64


def test_saved_folder_reads_with_the_libraries_own_loaders(loaded, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    models = loaded[False]
    out = save_sd_model(tmp_path / "m", models, fmt="diffusers_safetensors")
    assert_same_weights(UNet2DConditionModel.from_pretrained(out / "unet"), models.unet)
    assert_same_weights(AutoencoderKL.from_pretrained(out / "vae"), models.vae)
    assert_same_weights(CLIPTextModel.from_pretrained(out / "text_encoder"), models.text_encoders[0])
    assert CLIPTokenizer.from_pretrained(out / "tokenizer")("a photo of a cat").input_ids == [
        49406, 320, 1125, 539, 320, 2368, 49407,
    ]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not the temporary folder's 0700
    assert stat.S_IMODE((out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("fmt", ["safetensors", "diffusers_safetensors"])
def test_save_precision(loaded, tmp_path, fmt, tiny_sd1_dir):
    models = loaded[False]
    out = save_sd_model(tmp_path / FORMATS[fmt], models, fmt=fmt, dtype=save_dtype("fp16"))
    file = out if fmt == "safetensors" else out / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(file), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    again = load_sd_models(
        argparse.Namespace(pretrained_model_name_or_path=str(out), tokenizer_cache_dir=str(tiny_sd1_dir))
    )
    for k, v in models.unet.state_dict().items():
        assert torch.equal(again.unet.state_dict()[k], v.half().float()), k
    assert save_dtype("bf16") == torch.bfloat16 and save_dtype("float") == torch.float32 and save_dtype(None) is None


def test_ldm_layout_of_sd2_file(loaded, tmp_path):
    models = loaded[True]
    out = save_sd_model(tmp_path / "m.safetensors", models, fmt="safetensors")
    te = models.text_encoders[0].state_dict()
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        fused = f.get_tensor("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
        assert "cond_stage_model.model.transformer.resblocks.2.ln_1.weight" in keys  # unused last block
        assert "cond_stage_model.model.transformer.resblocks.3.ln_1.weight" not in keys
        assert f.get_tensor("cond_stage_model.model.text_projection").shape == (32, 32)
        assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in keys
        assert f.get_tensor("model.diffusion_model.input_blocks.1.1.proj_in.weight").ndim == 2  # linear (SD2)
        assert "sd_architecture" in f.metadata()
    expected = torch.cat([te[f"encoder.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(fused, expected)


def test_trained_unet_is_saved_and_existing_output_is_replaced_atomically(loaded, tmp_path):
    import copy

    models = loaded[False]
    out = save_sd_model(tmp_path / "m", models, fmt="diffusers")
    trained = copy.deepcopy(models.unet)
    with torch.no_grad():
        trained.conv_in.weight.add_(1.0)
    save_sd_model(out, models, fmt="diffusers", unet=torch.compile(trained))  # compiled modules are unwrapped
    again = load_sd_models(argparse.Namespace(pretrained_model_name_or_path=str(out)))
    assert_same_weights(again.unet, trained)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_bad_format_and_suffix(loaded, tmp_path):
    with pytest.raises(ValueError, match="unknown model format"):
        save_sd_model(tmp_path / "m.pt", loaded[False], fmt="pt")
    with pytest.raises(ValueError, match="must end with .ckpt"):
        save_sd_model(tmp_path / "m.safetensors", loaded[False], fmt="ckpt")


def test_argument_groups():
    import argparse

    from library.models.arguments import add_model_arguments, add_save_model_arguments

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    add_save_model_arguments(parser, choices=("ckpt", "pt", "safetensors"), default="safetensors")
    args = parser.parse_args(
        ["--pretrained_model_name_or_path", "m", "--v2", "--max_token_length", "225", "--clip_skip", "2"]
    )
    assert (args.v2, args.v_parameterization, args.max_token_length, args.clip_skip) == (True, False, 225, 2)
    assert args.save_model_as == "safetensors" and args.save_precision is None
    bad_args = (["--max_token_length", "100"], ["--clip_skip", "0"], ["--save_model_as", "diffusers"],
                ["--save_precision", "fp8"])
    for bad in bad_args:
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    full = argparse.ArgumentParser()
    add_save_model_arguments(full)
    assert full.parse_args(["--save_model_as", "diffusers_safetensors"]).save_model_as == "diffusers_safetensors"
