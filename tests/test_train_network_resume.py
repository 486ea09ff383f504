"""Stop + resume gives the same LoRA as an uninterrupted run (bitwise on CPU); damaged states are refused."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch

from tests.train_helpers import dataset_toml, load_lora, make_images, run_main, run_script, train_args


@pytest.fixture
def data(tmp_path):
    images = make_images(tmp_path / "images", count=5)
    return dataset_toml(tmp_path / "data.toml", images, batch_size=1,
                        extra_subset="flip_aug = true\nshuffle_caption = true\n")


RANDOM_BITS = ["--network_dropout", "0.1", "--noise_offset", "0.05", "--gradient_accumulation_steps", "2",
               "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--save_state"]


def test_resume_is_bit_exact(tiny_sd1_dir, data, tmp_path):
    # subprocesses: `python train_network.py` sets MKL_CBWR before torch loads (MKL's results otherwise depend on
    # memory alignment, so even two uninterrupted runs differ in the last bits)
    full = run_script(train_args(tiny_sd1_dir, tmp_path / "a", config=data, steps=6,
                                 extra=RANDOM_BITS + ["--save_every_n_steps", "2"]))
    assert full.returncode == 0, full.stderr[-3000:]
    state = tmp_path / "a" / "lora-step00000002-state"
    info = json.loads((state / "train_state.json").read_text())
    # 5 batches per epoch, 2 per step -> step 2 ends inside epoch 1 after 4 batches
    assert (info["epoch"], info["global_step"], info["batches_done"]) == (0, 2, 4)

    resumed = run_script(train_args(tiny_sd1_dir, tmp_path / "b", config=data, steps=6,
                                    extra=RANDOM_BITS + ["--resume", str(state)]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 1, step 2, 4 batches of the epoch done" in resumed.stdout
    assert "steps:  33%" in resumed.stderr  # the progress bar starts at step 2 of 6
    a, _ = load_lora(tmp_path / "a" / "lora.safetensors")
    b, meta_b = load_lora(tmp_path / "b" / "lora.safetensors")
    step2, _ = load_lora(tmp_path / "a" / "lora-step00000002.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], step2[k]) for k in a)
    assert meta_b["ss_steps"] == "6"


def test_damaged_or_partial_state_is_refused(tiny_sd1_dir, data, tmp_path):
    from library.errors import UserError

    run_main(train_args(tiny_sd1_dir, tmp_path / "a", config=data, steps=2,
                        extra=["--save_state_on_train_end"]))
    state = tmp_path / "a" / "lora-state"
    assert (state / "manifest.json").is_file()

    broken = tmp_path / "broken"
    shutil.copytree(state, broken)
    with open(broken / "optimizer.pt", "r+b") as f:
        f.seek(20)
        f.write(b"\x00\x01\x02")
    with pytest.raises(UserError, match="optimizer.pt does not match its checksum"):
        run_main(train_args(tiny_sd1_dir, tmp_path / "b", config=data, steps=3, extra=["--resume", str(broken)]))

    partial = tmp_path / "partial"
    shutil.copytree(state, partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(UserError, match="incomplete"):
        run_main(train_args(tiny_sd1_dir, tmp_path / "b", config=data, steps=3, extra=["--resume", str(partial)]))
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").iterdir())


def test_state_of_another_network_or_optimizer_is_refused(tiny_sd1_dir, data, tmp_path):
    from library.errors import UserError

    run_main(train_args(tiny_sd1_dir, tmp_path / "a", config=data, steps=1, extra=["--save_state_on_train_end"]))
    state = str(tmp_path / "a" / "lora-state")
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a" / "lora-state").iterdir()}
    assert modes == {0o666 & ~umask}  # not the 0600 of temporary files
    with pytest.raises(UserError, match="does not fit this run.*size mismatch"):
        run_main(train_args(tiny_sd1_dir, tmp_path / "b", config=data, steps=3,
                            extra=["--resume", state, "--network_dim", "8"]))
    with pytest.raises(UserError, match="saved with the optimizer torch.optim.adamw.AdamW, this run uses "
                                        "lion_pytorch"):
        run_main(train_args(tiny_sd1_dir, tmp_path / "c", config=data, steps=3,
                            extra=["--resume", state, "--optimizer_type", "Lion"]))


def test_state_of_another_process_count_is_refused_before_models_load(tiny_sd1_dir, data, tmp_path):
    import hashlib

    from library.errors import UserError

    run_main(train_args(tiny_sd1_dir, tmp_path / "a", config=data, steps=1, extra=["--save_state_on_train_end"]))
    state = tmp_path / "a" / "lora-state"
    info = json.loads((state / "train_state.json").read_text())
    (state / "train_state.json").write_text(json.dumps({**info, "num_processes": 2}))
    manifest = json.loads((state / "manifest.json").read_text())
    manifest["files"]["train_state.json"] = hashlib.sha256((state / "train_state.json").read_bytes()).hexdigest()
    (state / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="saved by 2 process.*resume with --num_processes 2"):
        run_main(train_args(tiny_sd1_dir, tmp_path / "b", config=data, steps=3,
                            extra=["--resume", str(state), "--cache_latents_to_disk"]))
    assert not list((tmp_path / "images").glob("*.npz"))  # refused before the VAE ran
