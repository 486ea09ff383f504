"""sd3_train.py on a tiny SD3.5 Medium: the saved single file (MMDiT + VAE + the trained text encoders) loads
back bit-exact, per-encoder learning rates reach the right weights, --num_last_block_to_freeze leaves whole
blocks unchanged, a diffusers folder loads in StableDiffusion3Pipeline, and bad options are one message."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from library.errors import UserError
from library.models.sd3.tiny import TinySD3Config, save_tiny_sd3_files
from tests.train_helpers import dataset_toml, make_images


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3ft")
    files = save_tiny_sd3_files(root / "m", TinySD3Config(variant="5-medium"))
    files["data"] = dataset_toml(root / "data.toml", make_images(root / "images", count=2), resolution=64)
    return files


def _argv(sd3, out, *, steps=2, extra=()):
    return ["--pretrained_model_name_or_path", str(sd3["sd3"]), "--dataset_config", str(sd3["data"]),
            "--output_dir", str(out), "--output_name", "ft", "--learning_rate", "1e-3", "--max_train_steps",
            str(steps), "--seed", "1", "--max_data_loader_n_workers", "0", "--tokenizer_cache_dir",
            str(sd3["tokenizer_cache_dir"]), "--t5xxl_max_token_length", "8", *extra]


def _main(argv):
    import sd3_train

    torch.set_num_threads(1)
    return sd3_train.main(argv)


def _load(model: Path, tokenizers: Path, **parts):
    from library.models.families import resolve_family

    args = argparse.Namespace(pretrained_model_name_or_path=str(model), clip_l=None, clip_g=None, t5xxl=None,
                              vae=None, mixed_precision="no", tokenizer_cache_dir=str(tokenizers),
                              pos_emb_random_crop_rate=0.0, enable_scaled_pos_embed=False)
    for k, v in parts.items():
        setattr(args, k, str(v))
    family = resolve_family(args, ("sd3",))
    return family.spec.load(args, family, device="cpu", dtype=torch.float32)


def test_fine_tunes_and_saves_a_single_file_that_loads_back(sd3, tmp_path):
    base = _load(sd3["sd3"], sd3["tokenizer_cache_dir"])
    out = _main(_argv(sd3, tmp_path / "out", extra=[
        "--train_text_encoder", "--learning_rate_te1", "1e-3", "--learning_rate_te2", "0",
        "--num_last_block_to_freeze", "1", "--cache_latents", "--save_clip"]))
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys)
    assert any(k.startswith("text_encoders.clip_g.transformer.") for k in keys)
    assert not any(k.startswith("text_encoders.t5xxl.") for k in keys)
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium"
    tuned = _load(out, sd3["tokenizer_cache_dir"], t5xxl=sd3["t5xxl"])
    b, t = base.unet.state_dict(), tuned.unet.state_dict()
    assert not torch.equal(b["transformer_blocks.0.attn.to_q.weight"], t["transformer_blocks.0.attn.to_q.weight"])
    assert all(torch.equal(b[k], t[k]) for k in b if k.startswith("transformer_blocks.1."))  # frozen last block
    l0, l1 = base.text_encoders[0].state_dict(), tuned.text_encoders[0].state_dict()
    g0, g1 = base.text_encoders[1].state_dict(), tuned.text_encoders[1].state_dict()
    key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(l0[key], l1[key]) and torch.equal(g0[key], g1[key])  # CLIP-G at lr 0


def test_diffusers_folder_out_loads_in_the_pipeline(sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = _main(_argv(sd3, tmp_path / "out", extra=["--save_model_as", "diffusers", "--cache_latents"]))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out), local_files_only=True)
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    tuned = _load(out, sd3["tokenizer_cache_dir"])
    assert tuned.family.base_model_version == "5-medium"


@pytest.mark.parametrize("extra, message", [
    (["--num_last_block_to_freeze", "3"], "has only 2 joint blocks; give at most 2"),
    (["--train_t5xxl"], "--train_t5xxl needs --train_text_encoder"),
    (["--learning_rate_te3", "1e-4", "--train_text_encoder"], "--learning_rate_te3 is given but that text encoder"),
    (["--blockwise_fused_optimizers"], "use --fused_backward_pass"),
    (["--fp8_base"], "--fp8_base / --fp8_base_unet store frozen weights in float8, but this script trains the "
                     "transformer itself"),
    (["--blocks_to_swap", "1", "--gradient_checkpointing"], "needs --fused_backward_pass or --blockwise_fused"),
    (["--save_model_as", "ckpt"], "SD3 models are saved as safetensors"),
])
def test_bad_options_are_one_message(sd3, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        _main(_argv(sd3, tmp_path / "out", extra=extra))
