"""The captioner trainers as whole programs: --output_config / --config_file, and two real processes
(accelerate launch --multi_gpu --num_processes 2, gloo on CPU) with resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.captioner_helpers import build_tiny_blip, make_pairs
from tests.train_helpers import run_script


def test_output_config_then_config_file(tmp_path):
    import train_blip_network

    model = build_tiny_blip(tmp_path / "model")
    data = tmp_path / "data"
    make_pairs(data, 6)
    config = tmp_path / "run.toml"
    with pytest.raises(SystemExit) as done:
        train_blip_network.main([str(data), str(tmp_path / "out"), "--model_id", str(model), "--max_train_steps",
                                 "2", "--rank", "4", "--target_modules", "self.query", "self.value",
                                 "--config_file", str(config), "--output_config"])
    assert done.value.code == 0
    text = config.read_text()
    assert "max_train_steps = 2" in text and "self.query" in text and "dataset_dir_arg" in text
    final = train_blip_network.main(["--config_file", str(config)])
    assert final == tmp_path / "out" and (final / "adapter_model.safetensors").is_file()


def test_two_processes_train_and_resume(tmp_path):
    model = build_tiny_blip(tmp_path / "model")
    data = tmp_path / "data"
    make_pairs(data, 12)
    common = [str(data), "--model_id", str(model), "--max_train_steps", "4", "--batch_size", "2", "--seed", "3",
              "--learning_rate", "1e-2", "--val_split", "0.34", "--dropout", "0"]
    first = run_script([*common[:1], str(tmp_path / "a"), *common[1:], "--save_every_n_steps", "2", "--save_state"],
                       processes=2, script="train_blip_network.py")
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "a"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(("logs", "README"))) == [
        "adapter_config.json", "adapter_model.safetensors", "lora-state", "lora-step00000002",
        "lora-step00000002-state"]
    state = out / "lora-step00000002-state"
    assert (state / "rng_0.pt").is_file() and (state / "rng_1.pt").is_file()
    second = run_script([*common[:1], str(tmp_path / "b"), *common[1:], "--resume", str(state)], processes=2,
                        script="train_blip_network.py")
    assert second.returncode == 0, second.stderr[-3000:]
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    single = run_script([*common[:1], str(tmp_path / "c"), *common[1:], "--resume", str(state)],
                        script="train_blip_network.py")
    assert single.returncode == 2 and "saved by 2 process(es)" in single.stderr
