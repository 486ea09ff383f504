"""fine_tune.py on a tiny model: metadata datasets (--in_json, metadata_file subsets), --train_text_encoder and
--learning_rate_te, --dataset_repeats, precision of saved files, EMA with --ema_sigma_rel, latents written
by finetune/prepare_buckets_latents.py, and the datasets it refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.full_weight_helpers import TE, UNET, assert_diffusers_loads_the_same, ldm_weights, part, same
from tests.train_helpers import ROOT, make_images




@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Images with a metadata file (keys are file stems, as merge_captions_to_metadata.py writes them)."""
    root = tmp_path_factory.mktemp("ft_data")
    images = make_images(root / "images", count=3, caption="unused")
    meta = {f"img{i}": {"caption": f"a painting {i}", "tags": "oil, canvas"} for i in range(3)}
    (root / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return {"images": images, "meta": root / "meta.json", "root": root}


def ft_args(model: Path, out: Path, data: dict[str, Path], *, steps: int, extra: list[str] | None = None) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--in_json", str(data["meta"]), "--train_data_dir",
            str(data["images"]), "--resolution", "64", "--train_batch_size", "2", "--output_dir", str(out),
            "--output_name", "ft", "--learning_rate", "1e-3", "--max_train_steps", str(steps), "--seed", "1",
            "--max_data_loader_n_workers", "0", *(extra or [])]


def run_ft(argv: list[str]) -> Path:
    import fine_tune

    path = fine_tune.main(argv)
    assert path is not None and path.exists()
    return path


def test_unet_only_by_default_from_in_json(tiny_sd1_dir, data, tmp_path, capsys):
    """Without --train_text_encoder only the UNet changes; --dataset_repeats multiplies the samples; the
    single file loads with diffusers offline (config from the base model's folder)."""
    out = tmp_path / "out"
    final = run_ft(ft_args(tiny_sd1_dir, out, data, steps=2,
                           extra=["--dataset_repeats", "2", "--save_model_as", "safetensors"]))
    assert final == out / "ft.safetensors"
    assert "3 images x 2 repeats = 6 samples" in capsys.readouterr().out
    base, trained = ldm_weights(tiny_sd1_dir), ldm_weights(final)
    assert same(part(base, TE), part(trained, TE))
    assert not same(part(base, UNET), part(trained, UNET))

    from safetensors import safe_open

    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["ss_steps"] == "2" and meta["ss_text_encoder_trained"] == "False"

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(final), config=str(tiny_sd1_dir), safety_checker=None,
                                                    local_files_only=True)
    from library.models.ldm_conversion import UNET_PREFIX, unet_diffusers_to_ldm

    unet = {UNET_PREFIX + k: v for k, v in unet_diffusers_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    assert same(part(unet, UNET), part(trained, UNET))


def test_train_text_encoder_with_its_own_rate(tiny_sd1_dir, data, tmp_path):
    """--train_text_encoder with --learning_rate_te 0: the text encoder is in the optimizer (its group's rate
    is 0, so it keeps its weights) while a rate > 0 changes it; saved as a diffusers folder with safetensors."""
    zero = run_ft(ft_args(tiny_sd1_dir, tmp_path / "a", data, steps=1, extra=[
        "--train_text_encoder", "--learning_rate_te", "0", "--save_model_as", "diffusers_safetensors",
        "--optimizer_type", "SGD"]))
    assert (zero / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    base = ldm_weights(tiny_sd1_dir)
    assert same(part(base, TE), part(ldm_weights(zero), TE))
    trained = run_ft(ft_args(tiny_sd1_dir, tmp_path / "b", data, steps=1, extra=[
        "--train_text_encoder", "--learning_rate_te", "1e-2", "--save_model_as", "diffusers_safetensors",
        "--optimizer_type", "SGD"]))
    assert not same(part(base, TE), part(ldm_weights(trained), TE))
    assert_diffusers_loads_the_same(trained, tiny_sd1_dir)


def test_full_bf16_and_save_precision_with_sigma_rel_ema(tiny_sd1_dir, data, tmp_path):
    """--full_bf16 trains bf16 weights (saved as bf16 by default, fp16 with --save_precision); the
    power-function EMA (--ema_sigma_rel, kept on the CPU) is saved beside, differs from the raw weights, and
    is pruned with them (--save_last_n_steps)."""
    final = run_ft(ft_args(tiny_sd1_dir, tmp_path / "a", data, steps=3, extra=[
        "--mixed_precision", "bf16", "--full_bf16", "--save_model_as", "safetensors", "--ema_sigma_rel", "0.2",
        "--ema_cpu", "--save_every_n_steps", "1", "--save_last_n_steps", "1"]))
    # pruned step saves take their EMA files with them
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "ft-ema.safetensors", "ft-step00000002-ema.safetensors", "ft-step00000002.safetensors", "ft.safetensors"]
    weights = ldm_weights(final)
    assert {v.dtype for k, v in weights.items() if v.is_floating_point()} == {torch.bfloat16}
    ema = ldm_weights(tmp_path / "a" / "ft-ema.safetensors")
    assert not same(part(ema, UNET), part(weights, UNET))
    assert same(part(ema, TE), part(weights, TE))

    fp16 = run_ft(ft_args(tiny_sd1_dir, tmp_path / "b", data, steps=1, extra=[
        "--save_model_as", "ckpt", "--save_precision", "fp16"]))
    assert {v.dtype for v in ldm_weights(fp16).values() if v.is_floating_point()} == {torch.float16}


def test_dreambooth_datasets_are_refused(tiny_sd1_dir, data, tmp_path):
    from library.errors import UserError

    db = make_images(tmp_path / "db" / "2_sks dog", count=1).parent
    argv = ["--pretrained_model_name_or_path", str(tiny_sd1_dir), "--train_data_dir", str(db),
            "--output_dir", str(tmp_path / "out"), "--resolution", "64"]
    with pytest.raises(UserError, match="fine_tune.py"):
        run_ft(argv)


PREPARE = ROOT / "finetune" / "prepare_buckets_latents.py"


@pytest.mark.skipif(not PREPARE.is_file(), reason="finetune/prepare_buckets_latents.py is not in this branch")
def test_latents_from_prepare_buckets_latents_are_used_as_they_are(tiny_sd1_dir, data, tmp_path, capsys):
    """The .npz files written by prepare_buckets_latents.py are valid cache entries for fine_tune.py: training
    from its metadata (which turns --cache_latents_to_disk on, as sd-scripts reads them without the option)
    encodes nothing and leaves them untouched."""
    images = tmp_path / "images"
    make_images(images, count=2, size=(64, 96))
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({f"img{i}": {"caption": f"a painting {i}"} for i in range(2)}), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(PREPARE), str(images), str(meta), str(tmp_path / "meta_lat.json"),
                           str(tiny_sd1_dir), "--max_resolution", "64,64", "--min_bucket_reso", "64",
                           "--max_bucket_reso", "128"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    npz = sorted(images.glob("*.npz"))
    assert len(npz) == 2
    stamps = {p: p.stat().st_mtime_ns for p in npz}

    data_lat = {"meta": tmp_path / "meta_lat.json", "images": images}
    final = run_ft(ft_args(tiny_sd1_dir, tmp_path / "out", data_lat, steps=1, extra=[
        "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--save_model_as", "safetensors"]))
    assert final.is_file()
    assert "its latents are used, as with --cache_latents_to_disk" in capsys.readouterr().out
    assert sorted(images.glob("*.npz")) == npz
    assert {p: p.stat().st_mtime_ns for p in npz} == stamps


def test_full_fp16_gradients_can_be_unscaled():
    """--full_fp16 trains fp16 weights: the grad scaler must unscale their fp16 gradients (CUDA-only in a run;
    the scaler logic is the same on the CPU)."""
    from library.training.preparation import allow_fp16_gradients

    param = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))
    param.grad = torch.full((4,), 8.0, dtype=torch.float16)
    with pytest.raises(ValueError, match="FP16"):
        scaler.unscale_(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))
    allow_fp16_gradients(scaler)
    scaler.unscale_(optimizer)
    assert torch.equal(param.grad, torch.full((4,), 2.0, dtype=torch.float16))


def test_sd2_v_parameterization_single_file(tiny_sd2_dir, data, tmp_path):
    """SD2 (OpenCLIP text encoder layout, v-prediction): a trained single file loads back with our loader."""
    import argparse

    from library.models.loading import load_sd_models
    from library.models.saving import ldm_state_dict

    final = run_ft(ft_args(tiny_sd2_dir, tmp_path / "out", data, steps=1, extra=[
        "--v2", "--v_parameterization", "--train_text_encoder", "--save_model_as", "safetensors"]))
    saved = ldm_weights(final)
    assert any(k.startswith("cond_stage_model.model.") for k in saved)
    loaded = load_sd_models(argparse.Namespace(pretrained_model_name_or_path=str(final), v2=True,
                                               v_parameterization=True, tokenizer_cache_dir=str(tiny_sd2_dir)))
    assert same(part(ldm_state_dict(loaded), "cond_stage_model."), part(saved, "cond_stage_model."))
    base = load_sd_models(argparse.Namespace(pretrained_model_name_or_path=str(tiny_sd2_dir), v2=True))
    assert not same(part(ldm_state_dict(base), "cond_stage_model."), part(saved, "cond_stage_model."))
