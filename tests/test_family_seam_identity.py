"""The model-family seam changed no output: LoRA files, checkpoints and samples written by the trainers are
the same, byte for byte, as those of the code before the seam (issue 10, part 1).

The digests below were produced by the pre-seam code (main at 99923e3) with the same commands. Every tensor's
bytes, dtype and shape count, and every metadata entry except the few that record wall-clock time or a random
session id. A digest that changes means a trainer's output changed: find out why before updating it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests.train_helpers import dreambooth_dir, make_images, run_main, train_args

VOLATILE = {"ss_session_id", "ss_training_started_at", "ss_training_finished_at", "modelspec.date"}

EXPECTED = {
    "sd1_lora": "5eeb81757804b659972312e27f56e93f1aa389d3d1095c4d1e034947f07f458b",
    "sd1_lora_cached": "b649d38faa57564d15f113739e0bf752605d022ac36f8f877685b6ee40901d95",
    "sd2v_lora": "2b01544154d69e88833028e9a72d9b0eed1d5d448b4315d19bb896d445567f5c",
    "sd1_db": "5695270fb11c65467ff35dd4c1e660223e2c7275d603f169c325289e89d39335",
    "sd1_sample": "5b92d4d076829cab43146ff0cf28219582b61ca21183e148928a7800f562cb93",
}


def digest(path: Path) -> str:
    """SHA-256 over the sorted tensors (name, dtype, shape, bytes) and the non-volatile metadata of a
    safetensors file; over the bytes of any other file."""
    h = hashlib.sha256()
    if path.suffix != ".safetensors":
        h.update(path.read_bytes())
        return h.hexdigest()
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k not in VOLATILE}
        h.update(json.dumps(meta, sort_keys=True).encode())
        for key in sorted(f.keys()):
            t = f.get_tensor(key).contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check(name: str, path: Path) -> None:
    assert path.is_file(), path
    assert digest(path) == EXPECTED[name], f"{name}: {path} differs from the pre-seam output"


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    return dreambooth_dir(tmp_path_factory.mktemp("seam") / "train", count=2, repeats=1)


def test_sd1_lora_with_text_encoder_locon_and_samples(tiny_sd1_dir, train_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks thing --w 64 --h 64 --s 3 --d 5\n", encoding="utf-8")
    final = run_main(train_args(tiny_sd1_dir, tmp_path / "out", data=train_dir, steps=2, extra=[
        "--network_args", "conv_dim=2", "conv_alpha=1", "--clip_skip", "2", "--max_token_length", "150",
        "--weighted_captions", "--sample_prompts", str(prompts), "--sample_every_n_steps", "2"]))
    _check("sd1_lora", final)
    samples = sorted((tmp_path / "out" / "sample").glob("*.png"))
    assert len(samples) == 1
    _check("sd1_sample", samples[0])


def test_sd1_lora_cached_text_and_latents(tiny_sd1_dir, train_dir, tmp_path):
    final = run_main(train_args(tiny_sd1_dir, tmp_path / "out", data=train_dir, steps=2, extra=[
        "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs", "--noise_offset", "0.1",
        "--min_snr_gamma", "5"]))
    _check("sd1_lora_cached", final)


def test_sd2_v_prediction_lora(tiny_sd2_dir, train_dir, tmp_path):
    final = run_main(train_args(tiny_sd2_dir, tmp_path / "out", data=train_dir, steps=2, extra=[
        "--v2", "--v_parameterization", "--zero_terminal_snr", "--scale_v_pred_loss_like_noise_pred"]))
    _check("sd2v_lora", final)


def test_sd1_dreambooth_checkpoint(tiny_sd1_dir, train_dir, tmp_path):
    import train_db

    images = make_images(tmp_path / "reg" / "1_thing", count=2, caption="a thing", seed=3).parent
    final = train_db.main([
        "--pretrained_model_name_or_path", str(tiny_sd1_dir), "--train_data_dir", str(train_dir),
        "--reg_data_dir", str(images), "--resolution", "64", "--train_batch_size", "2", "--output_dir",
        str(tmp_path / "out"), "--output_name", "db", "--learning_rate", "1e-4", "--max_train_steps", "2",
        "--seed", "1", "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors",
        "--save_precision", "fp16"])
    _check("sd1_db", final)
