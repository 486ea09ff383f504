"""Nothing the user owns is lost (issue 13): emergency saves, stale temporaries of killed saves, resume
warnings, and Ctrl-C in a two-process run (every process stops after the same step, one state is saved)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from library.errors import UserError
from tests.train_helpers import ROOT, dataset_toml, load_lora, make_images, prepare_run, run_main, train_args


@pytest.fixture
def data(tmp_path) -> Path:
    return dataset_toml(tmp_path / "data.toml", make_images(tmp_path / "images", count=2), batch_size=1)


def test_output_dir_broken_during_the_run_saves_an_emergency_file(tiny_sd1_dir, data, tmp_path, monkeypatch,
                                                                  capsys):
    from library.training.loop import train

    out = tmp_path / "out"
    run = prepare_run(train_args(tiny_sd1_dir, out, config=data, steps=2, name="l"))
    out.write_text("the folder was replaced by a file while training")  # the final save must fail
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(UserError, match="were saved to .*l-emergency-step00000002.safetensors instead") as err:
        try:
            train(run)
        finally:
            run.accelerator.end_training()
    emergency = cwd / "l-emergency-step00000002.safetensors"
    assert str(emergency) in err.value.message and str(out) in err.value.message
    tensors, _ = load_lora(emergency)
    assert any(k.endswith("lora_up.weight") for k in tensors)
    assert any(bool(v.abs().sum() > 0) for k, v in tensors.items() if k.endswith("lora_up.weight"))  # trained
    assert out.read_text() == "the folder was replaced by a file while training"


def test_state_that_cannot_be_written_keeps_the_weights_in_an_emergency_file(tiny_sd1_dir, data, tmp_path,
                                                                              monkeypatch):
    from library.training.loop import _snapshot, _write_state, train
    from library.training.state import Progress

    out = tmp_path / "out"
    run = prepare_run(train_args(tiny_sd1_dir, out, config=data, steps=2, name="l"))
    try:
        train(run)
        monkeypatch.chdir(tmp_path)
        blocked = tmp_path / "a-file"
        blocked.write_text("a file where the state's folder must go")
        with pytest.raises(UserError, match=r"could not save .*a-file/l-state .*saved to .*l-emergency-step00000002"):
            _write_state(run, blocked / "l-state", _snapshot(run, Progress(epoch=1, global_step=2)))
    finally:
        run.accelerator.end_training()
    assert (tmp_path / "l-emergency-step00000002.safetensors").is_file()
    assert blocked.read_text() == "a file where the state's folder must go"


def test_output_name_too_long_for_the_temporaries_is_refused(tiny_sd1_dir, data, tmp_path):
    with pytest.raises(UserError, match="--output_name .* is too long"):
        run_main(train_args(tiny_sd1_dir, tmp_path / "out", config=data, steps=1, name="x" * 230))


def test_stale_temporaries_of_this_run_are_removed_and_said(tiny_sd1_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    ours = [out / ".l.safetensors.k3j9x_2a.tmp", out / ".l-step00000002.safetensors.abcdefgh.tmp",
            out / ".l-state.partial", out / ".l-step00000004-state.old"]
    ours[0].write_bytes(b"half a LoRA")
    ours[1].write_bytes(b"half a LoRA")
    for folder in ours[2:]:
        folder.mkdir()
        (folder / "weights.safetensors").write_bytes(b"x")
    others = [out / ".other.safetensors.abcdefgh.tmp", out / ".notes.txt", out / "user-file.tmp"]
    for path in others:
        path.write_bytes(b"not ours")
    run_main(train_args(tiny_sd1_dir, out, config=data, steps=1, name="l"))
    printed = capsys.readouterr().out
    assert "removed 4 unfinished temporary save(s)" in printed and ".l.safetensors.k3j9x_2a.tmp" in printed
    assert not any(p.exists() for p in ours)
    assert all(p.read_bytes() == b"not ours" for p in others)
    assert (out / "l.safetensors").is_file()


def test_diffusers_save_temporary_folder_is_removed(tmp_path):
    from library.io_utils import remove_stale_temporaries

    stale = tmp_path / ".model.abcd_123.tmp"  # a killed diffusers-folder save: a whole model copy
    (stale / "unet").mkdir(parents=True)
    (stale / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 100)
    assert remove_stale_temporaries(tmp_path, lambda name: name == "model") == [stale]
    assert not stale.exists()


def test_resume_on_a_changed_dataset_warns(tiny_sd1_dir, tmp_path, capsys):
    images = make_images(tmp_path / "images", count=2)
    data = dataset_toml(tmp_path / "data.toml", images, batch_size=1)
    out = tmp_path / "out"
    run_main(train_args(tiny_sd1_dir, out, config=data, steps=2, name="l",
                        extra=["--save_state", "--save_every_n_steps", "1"]))
    state = out / "l-step00000001-state"
    assert len(json.loads((state / "train_state.json").read_text())["dataset"]) == 16
    capsys.readouterr()
    run_main(train_args(tiny_sd1_dir, out, config=data, steps=2, name="l", extra=["--resume", str(state)]))
    assert "dataset differs" not in capsys.readouterr().out
    make_images(tmp_path / "more", count=1, seed=5)
    (tmp_path / "more" / "img0.png").rename(images / "extra.png")
    (tmp_path / "more" / "img0.caption").rename(images / "extra.caption")
    run_main(train_args(tiny_sd1_dir, out, config=data, steps=3, name="l", extra=["--resume", str(state)]))
    assert "warning: the dataset differs from the one the resumed run trained on" in capsys.readouterr().out


def test_ctrl_c_stops_two_processes_at_the_same_step_and_saves_one_state(tiny_sd1_dir, tmp_path):
    data = dataset_toml(tmp_path / "data.toml", make_images(tmp_path / "images", count=4), batch_size=1)
    out = tmp_path / "out"
    argv = train_args(tiny_sd1_dir, out, config=data, steps=100000, name="l",
                      extra=["--save_state", "--network_train_unet_only"])
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29500 + (os.getpid() + 7) % 1000), str(ROOT / "train_network.py"), *argv]
    log = tmp_path / "log.txt"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while "steps:" not in log.read_text() or "/100000 [" not in log.read_text().split("steps:")[-1]:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
            time.sleep(2)  # a few steps in
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: every process gets it
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode != 0, text[-4000:]
    for trace in text.split("Traceback (most recent call last):")[1:]:  # torch's launcher reports the signal
        assert "SignalException" in trace and "train_network.py" not in trace and "library/" not in trace, trace
    stopped = dict(re.findall(r"process (\d): stopped after step (\d+)", text))  # lines may follow a bar
    assert set(stopped) == {"0", "1"} and len(set(stopped.values())) == 1, text[-3000:]
    step = int(stopped["0"])
    state = out / f"l-step{step:08d}-state"
    assert f"interrupted: state of step {step} saved to {state}" in text
    from library.training.state import verify_state

    info = verify_state(state)
    assert info["global_step"] == step >= 1 and info["num_processes"] == 2
    assert (state / "rng_0.pt").is_file() and (state / "rng_1.pt").is_file()
    assert torch.load(state / "optimizer.pt", weights_only=True)["state"]  # a real optimizer state
