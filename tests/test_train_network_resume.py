"""Stop + resume gives the same LoRA as an uninterrupted run (bitwise on CPU); damaged states are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.train_helpers import dataset_toml, load_lora, make_images, run_main, train_args


@pytest.fixture
def data(tmp_path):
    images = make_images(tmp_path / "images", count=5)
    return dataset_toml(tmp_path / "data.toml", images, batch_size=1,
                        extra_subset="flip_aug = true\nshuffle_caption = true\n")


RANDOM_BITS = ["--network_dropout", "0.1", "--noise_offset", "0.05", "--gradient_accumulation_steps", "2",
               "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--save_state"]


def test_resume_is_bit_exact(tiny_sd1_dir, data, tmp_path):
    full = run_main(train_args(tiny_sd1_dir, tmp_path / "a", config=data, steps=6,
                               extra=RANDOM_BITS + ["--save_every_n_steps", "2"]))
    state = tmp_path / "a" / "lora-step00000002-state"
    info = json.loads((state / "train_state.json").read_text())
    # 5 batches per epoch, 2 per step -> step 2 ends inside epoch 1 after 4 batches
    assert (info["epoch"], info["global_step"], info["batches_done"]) == (0, 2, 4)

    resumed = run_main(train_args(tiny_sd1_dir, tmp_path / "b", config=data, steps=6,
                                  extra=RANDOM_BITS + ["--resume", str(state)]))
    a, meta_a = load_lora(full)
    b, meta_b = load_lora(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert meta_b["ss_steps"] == "6"
    # and the resumed run really continued from the state rather than starting over
    c = run_main(train_args(tiny_sd1_dir, tmp_path / "c", config=data, steps=4, extra=RANDOM_BITS))
    assert not all(torch.equal(a[k], load_lora(c)[0][k]) for k in a)


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
