"""finetune/prepare_buckets_latents.py: latents written through the training cache and reused by training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from library.config.params import DatasetGroupParams, DatasetParams, FineTuningSubsetParams
from library.dataset import build_dataset_group
from library.dataset.latent_cache import npz_path
from library.errors import UserError
from library.tools.prepare_latents import main

ROOT = Path(__file__).resolve().parents[1]
# (w, h) -> bucket with --max_resolution 128,128 --min_bucket_reso 64 --max_bucket_reso 256
SIZES = {"wide": (256, 96), "square": (96, 96), "tall": (64, 192)}
BUCKETS = {"wide": (192, 64), "square": (128, 128), "tall": (64, 192)}
BUCKET_ARGS = ["--max_resolution", "128,128", "--min_bucket_reso", "64", "--max_bucket_reso", "256"]


@pytest.fixture
def data(tmp_path, image_factory):
    """A folder with three images (two of them in the metadata) and a metadata file with one stale entry."""
    folder = tmp_path / "train"
    for i, (name, size) in enumerate(SIZES.items()):
        image_factory(folder / f"{name}.png", size, seed=i)
    in_json = tmp_path / "meta_clean.json"
    meta = {"wide": {"caption": "a wide picture"}, str((folder / "square.png").resolve()): {"tags": "square"},
            "gone": {"caption": "deleted image"}}
    in_json.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return folder, in_json


def run_tool(folder, in_json, out_json, model, *extra) -> None:
    assert main([str(folder), str(in_json), str(out_json), str(model), *BUCKET_ARGS, "--batch_size", "2",
                 *extra]) == 0


def training_group(folder: Path, out_json: Path, *, flip_aug: bool):
    """The dataset fine_tune.py / train_network.py build from ``--in_json out_json --train_data_dir folder``."""
    subset = FineTuningSubsetParams(origin="test", image_dir=str(folder), metadata_file=str(out_json),
                                    flip_aug=flip_aug)
    ds = DatasetParams(origin="test", kind="finetuning", subsets=[subset], resolution=(128, 128), batch_size=2,
                       enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256)
    return build_dataset_group(DatasetGroupParams([ds], source="test"), seed=0)


def training_vae_key(model: Path) -> tuple:
    """The VAE and cache key as the trainer gets them (full model loader, float32)."""
    from library.models.loading import load_sd_models
    from library.training.preparation import make_vae_encoder, vae_cache_key

    models = load_sd_models(Namespace(pretrained_model_name_or_path=str(model)))
    return make_vae_encoder(models.vae, torch.device("cpu"), torch.float32), vae_cache_key(models.vae, torch.float32)


class Counting:
    def __init__(self, encode):
        self.encode, self.images = encode, 0

    def __call__(self, x):
        self.images += x.shape[0]
        return self.encode(x)


def test_writes_latents_and_training_reuses_them(data, tmp_path, tiny_sd1_dir, capsys):
    folder, in_json = data
    before = in_json.read_bytes()
    out_json = tmp_path / "meta_lat.json"
    run_tool(folder, in_json, out_json, tiny_sd1_dir, "--flip_aug")
    report = capsys.readouterr().out
    assert in_json.read_bytes() == before, "in_json is never modified"

    out = json.loads(out_json.read_text(encoding="utf-8"))
    square_key = str((folder / "square.png").resolve())
    assert out["wide"] == {"caption": "a wide picture", "train_resolution": [192, 64]}
    assert out[square_key] == {"tags": "square", "train_resolution": [128, 128]}
    assert out["tall"] == {"train_resolution": [64, 192]}  # image missing from the metadata: added and reported
    assert out["gone"] == {"caption": "deleted image"}  # entry without image: kept and reported
    assert "gone" in report and "tall.png" in report
    assert "192x64: 1" in report and "128x128: 1" in report and "mean aspect ratio error" in report

    for name, size in SIZES.items():
        bw, bh = BUCKETS[name]
        npz = npz_path(folder / f"{name}.png", size)
        with np.load(npz) as f:
            assert f["latents"].shape == (4, bh // 8, bw // 8)
            assert f["latents_flipped"].shape == (4, bh // 8, bw // 8)
            assert not np.allclose(f["latents"], f["latents_flipped"])
            assert f["original_size"].tolist() == list(size)

    encode, key = training_vae_key(tiny_sd1_dir)
    group = training_group(folder, out_json, flip_aug=True)
    assert sorted(img.choice.bucket for img in group.train[0].images) == sorted(BUCKETS.values())
    counting = Counting(encode)
    group.cache_latents(counting, cache_key=key, to_disk=True, batch_size=2)
    assert counting.images == 0, "training found every prepared entry valid and encoded nothing"
    for i, img in enumerate(group.train[0].images):
        entry = group.latents.get(False, 0, i)
        assert entry.latents_flipped is not None
        with torch.no_grad():
            fresh = encode(_prepared(group, i))
        tol = 2e-2 if torch.cuda.is_available() else 1e-5  # the tool encodes on the GPU when there is one (TF32)
        torch.testing.assert_close(entry.latents, fresh[0], atol=tol, rtol=tol)


def _prepared(group, i: int) -> torch.Tensor:
    from library.dataset.samples import prepare_for_cache

    ds = group.train[0]
    return prepare_for_cache(ds.images[i], ds).image[None]


def test_skip_existing_keeps_valid_and_recomputes_stale(data, tmp_path, tiny_sd1_dir, image_factory, capsys):
    folder, in_json = data
    out_json = tmp_path / "meta_lat.json"
    run_tool(folder, in_json, out_json, tiny_sd1_dir)
    npzs = {name: npz_path(folder / f"{name}.png", size) for name, size in SIZES.items()}
    stamps = {name: p.stat().st_mtime_ns for name, p in npzs.items()}
    with np.load(npzs["square"]) as f:
        old_square = f["latents"].copy()
    image_factory(folder / "square.png", SIZES["square"], seed=42)  # same size, new content
    capsys.readouterr()

    run_tool(folder, in_json, out_json, tiny_sd1_dir, "--skip_existing")
    assert "1 image(s) encoded, 2 already up to date" in capsys.readouterr().out
    assert npzs["wide"].stat().st_mtime_ns == stamps["wide"] and npzs["tall"].stat().st_mtime_ns == stamps["tall"]
    with np.load(npzs["square"]) as f:
        assert not np.allclose(f["latents"], old_square)

    run_tool(folder, in_json, out_json, tiny_sd1_dir / "vae", "--skip_existing")  # the same VAE, alone
    assert "0 image(s) encoded, 3 already up to date" in capsys.readouterr().out
    run_tool(folder, in_json, out_json, _single_file(tiny_sd1_dir, tmp_path), "--skip_existing")  # as a checkpoint
    assert "0 image(s) encoded, 3 already up to date" in capsys.readouterr().out

    run_tool(folder, in_json, out_json, tiny_sd1_dir)  # without --skip_existing: everything again
    assert "3 image(s) encoded" in capsys.readouterr().out
    assert npzs["wide"].stat().st_mtime_ns != stamps["wide"]


def _single_file(model_dir: Path, tmp_path: Path) -> Path:
    from library.models.loading import load_sd_models
    from library.models.saving import save_sd_model

    models = load_sd_models(Namespace(pretrained_model_name_or_path=str(model_dir)))
    return save_sd_model(tmp_path / "model.safetensors", models, fmt="safetensors")


def test_broken_image_alpha_mask_and_in_place_update(data, tiny_sd1_dir, image_factory, capsys):
    folder, in_json = data
    (folder / "broken.png").write_bytes(b"not a png at all")
    image_factory(folder / "sub" / "rgba.png", (64, 64), seed=5, mode="RGBA")
    run_tool(folder, in_json, in_json, tiny_sd1_dir, "--mixed_precision", "bf16", "--alpha_mask", "--recursive")
    captured = capsys.readouterr()
    assert "broken.png" in captured.out and "broken.png" in captured.err
    out = json.loads(in_json.read_text(encoding="utf-8"))  # out_json == in_json: updated in place
    assert out["wide"]["train_resolution"] == [192, 64] and "broken" not in out
    with np.load(npz_path(folder / "wide.png", SIZES["wide"])) as f:
        assert '"vae": "vae-' in str(f["cache_meta"]) and '-bfloat16"' in str(f["cache_meta"])
        assert f["alpha_mask"].shape == (64, 192) and np.all(f["alpha_mask"] == 1.0)  # opaque RGB image
    assert out["sub/rgba"]["train_resolution"] == [128, 128]
    with np.load(npz_path(folder / "sub" / "rgba.png", (64, 64))) as f:
        assert f["latents"].shape == (4, 16, 16) and f["alpha_mask"].shape == (128, 128)
        assert 0.0 <= f["alpha_mask"].min() < f["alpha_mask"].max() <= 1.0


def test_input_errors_name_the_file(data, tmp_path, tiny_sd1_dir):
    folder, in_json = data
    with pytest.raises(UserError, match=r"nope\.safetensors: file or folder not found"):
        main([str(folder), str(in_json), str(tmp_path / "o.json"), str(tmp_path / "nope.safetensors")])
    assert not (tmp_path / "o.json").exists() and not list(folder.glob("*.npz"))
    with pytest.raises(UserError, match="bucket_reso_steps = 32 must be a positive multiple of 64"):
        main([str(folder), str(in_json), str(tmp_path / "o.json"), str(tiny_sd1_dir), "--bucket_reso_steps", "32"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"junk")
    with pytest.raises(UserError, match="no usable image in .*bad"):
        main([str(bad), str(in_json), str(tmp_path / "o.json"), str(tiny_sd1_dir)])
    assert not (tmp_path / "o.json").exists()
    in_json.write_text('{"wide": {"caption": "x"},\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"meta_clean\.json: invalid JSON at line 2"):
        main([str(folder), str(in_json), str(tmp_path / "o.json"), "no-model-needed-yet"])
    with pytest.raises(UserError, match="max_resolution"):
        main([str(folder), str(in_json), str(tmp_path / "o.json"), "m", "--max_resolution", "512x512"])
    with pytest.raises(UserError, match="folder not found"):
        main([str(tmp_path / "nope"), str(in_json), str(tmp_path / "o.json"), "m"])


def test_script_runs_from_repo_root(data, tmp_path):
    folder, in_json = data
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "finetune/prepare_buckets_latents.py", str(folder), str(tmp_path / "x.json"),
                           str(tmp_path / "o.json"), "model"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "x.json: metadata file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_train_network_uses_prepared_latents(data, tmp_path, tiny_sd1_dir):
    """The real trainer with --in_json and --cache_latents_to_disk reads the entries and rewrites none."""
    from tests.train_helpers import run_main

    folder, in_json = data
    out_json = tmp_path / "meta_lat.json"
    run_tool(folder, in_json, out_json, tiny_sd1_dir, "--flip_aug")
    npzs = [npz_path(folder / f"{name}.png", size) for name, size in SIZES.items()]
    before = [(p.stat().st_mtime_ns, p.read_bytes()) for p in npzs]
    final = run_main(["--pretrained_model_name_or_path", str(tiny_sd1_dir), "--output_dir", str(tmp_path / "out"),
                      "--network_dim", "4", "--learning_rate", "1e-3", "--seed", "1", "--max_train_steps", "1",
                      "--max_data_loader_n_workers", "0", "--in_json", str(out_json), "--train_data_dir", str(folder),
                      "--resolution", "128", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "256",
                      "--flip_aug", "--cache_latents_to_disk", "--train_batch_size", "1"])
    assert final is not None and Path(final).is_file()
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in npzs] == before


def test_sd3_training_uses_prepared_latents(data, tmp_path):
    """prepare_buckets_latents.py with an SD3 single file writes *_sd3.npz entries that sd3_train_network.py
    reads and rewrites none of."""
    import sd3_train_network
    from library.models.sd3.tiny import TinySD3Config, save_tiny_sd3_files

    folder, in_json = data
    files = save_tiny_sd3_files(tmp_path / "sd3", TinySD3Config(variant="medium"))
    out_json = tmp_path / "meta_lat.json"
    run_tool(folder, in_json, out_json, files["sd3"])
    npzs = sorted(folder.glob("*_sd3.npz"))
    assert len(npzs) == len(SIZES)
    with np.load(npzs[0]) as f:
        assert f["latents"].shape[0] == 16
    before = [(p.stat().st_mtime_ns, p.read_bytes()) for p in npzs]
    torch.set_num_threads(1)
    final = sd3_train_network.main([
        "--pretrained_model_name_or_path", str(files["sd3"]), "--tokenizer_cache_dir", str(files["tokenizer_cache_dir"]),
        "--t5xxl_max_token_length", "8", "--output_dir", str(tmp_path / "out"), "--network_dim", "4",
        "--learning_rate", "1e-3", "--seed", "1", "--max_train_steps", "1", "--max_data_loader_n_workers", "0",
        "--in_json", str(out_json), "--train_data_dir", str(folder), "--resolution", "128", "--enable_bucket",
        "--min_bucket_reso", "64", "--max_bucket_reso", "256", "--cache_latents_to_disk", "--train_batch_size", "1"])
    assert final is not None and Path(final).is_file()
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in npzs] == before


@pytest.mark.parametrize("keys, flags, expected", [
    ({"encoder.conv_out.weight": (8, 4, 3, 3)}, [], "sd1"),  # a 4-channel VAE alone: SD1.x/2.x
    ({"encoder.conv_out.weight": (8, 4, 3, 3)}, ["--sdxl"], "sdxl"),
    ({"first_stage_model.encoder.conv_out.weight": (32, 4, 3, 3)}, ["--flux"], "flux1-dev"),
    ({"encoder.conv_out.weight": (32, 4, 3, 3)}, ["--lumina"], "lumina2"),
    ({"conditioner.embedders.0.transformer.x": (1,), "first_stage_model.encoder.conv_out.weight": (8, 4, 3, 3)}, [],
     "sdxl"),
    ({"encoder.conv_out.weight": (32, 4, 3, 3)}, [], "16-channel autoencoder given alone; add --flux (FLUX.1 "
                                                     "training) or --lumina (Lumina 2 training)"),
    ({"encoder.conv_out.weight": (32, 4, 3, 3)}, ["--sdxl"], "--sdxl: .* is a VAE with 16 latent channels"),
    ({"encoder.conv_out.weight": (8, 4, 3, 3)}, ["--flux"], "--flux: .* is a VAE with 4 latent channels"),
    ({"encoder.conv_out.weight": (12, 4, 3, 3)}, [], "6 latent channels, which no model family here uses"),
    ({"encoder.conv_out.weight": (8, 4, 3, 3)}, ["--sdxl", "--lumina"], "--sdxl and --lumina name different"),
    ({"conditioner.embedders.0.transformer.x": (1,)}, ["--flux"], "model of the SDXL family .* remove --flux"),
    ({"model.layers.0.weight": (1,)}, ["--flux"], "no VAE weights found"),
])
def test_the_family_of_the_latents_comes_from_the_file_and_the_flags(tmp_path, keys, flags, expected):
    """The family seam's choice (header only, nothing loads): recognised checkpoints, a VAE alone with or without
    a family flag, and every disagreement refused with the flag to change."""
    from safetensors.torch import save_file

    from library.models.families.latents import latent_family
    from library.tools.prepare_latents import build_parser

    model = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(model))
    args = build_parser().parse_args(["data", "in.json", "out.json", str(model), *flags])
    if " " not in expected:
        assert latent_family(args, model).name == expected
    else:
        with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            latent_family(args, model)
