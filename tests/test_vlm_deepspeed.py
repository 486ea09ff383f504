"""vlm_train.py --deepspeed: the shipped ZeRO-2/3 configs, the accelerate DeepSpeedPlugin built from them, every
config problem named before any model loads, and the refusal where deepspeed or CUDA is missing. deepspeed is not
pinned (it builds against a CUDA toolkit), so the training runs below are marked slow and skipped without it: they run
DeepSpeed's CPU backend (gloo) with the CUDA refusal switched off, against the same run without DeepSpeed."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.errors import UserError
from library.training.deepspeed_setup import (SHIPPED_CONFIGS, deepspeed_config_for_run, deepspeed_plugin,
                                              deepspeed_problems, read_deepspeed_config)


def _args(**overrides) -> argparse.Namespace:
    values = dict(deepspeed="zero2", train_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=1.0,
                  mixed_precision="bf16", save_state=False, resume=None, q_lora=False, use_lora=True)
    return argparse.Namespace(**{**values, **overrides})


def _problems(tmp_path: Path, config: dict | str, **overrides) -> list[str]:
    path = tmp_path / "ds.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return deepspeed_problems(_args(deepspeed=str(path), **overrides), cuda=True)[1]


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3.json", 3), (str(SHIPPED_CONFIGS / "zero2.json"), 2)])
def test_shipped_configs_build_the_accelerate_plugin(name, stage):
    settings, problems = read_deepspeed_config(name)
    assert problems == [] and settings.stage == stage and settings.path.parent == SHIPPED_CONFIGS
    args = _args(deepspeed=name)
    config = deepspeed_config_for_run(settings, args, num_processes=4, hidden_size=64)
    # the loop accumulates (DeepSpeed's own accumulation stays 1), the batch entries come from the options
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (2, 1, 8, 1.0)
    # "auto" buckets from the language model's width (a VLM's top-level config has no hidden_size)
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64
    if stage == 3:
        assert (zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) == (3686, 640)
    assert settings.config["train_batch_size"] == "auto"  # the shipped file is untouched
    assert settings.config["zero_optimization"]["reduce_bucket_size"] == "auto"
    plugin = deepspeed_plugin(settings, args, num_processes=4, hidden_size=64)
    assert type(plugin).__name__ == "DeepSpeedPlugin" and plugin.zero_stage == stage
    assert plugin.gradient_accumulation_steps == 1 and plugin.hf_ds_config.is_zero3() == (stage == 3)
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == stage
    assert plugin.deepspeed_config["bf16"] == {"enabled": "auto"}  # filled by accelerate from --mixed_precision


def test_a_good_config_on_a_cuda_machine_with_deepspeed_has_no_problems(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else
                        real(name, *a))
    settings, problems = deepspeed_problems(_args(deepspeed="zero3"), cuda=True)
    assert problems == [] and settings.stage == 3


@pytest.mark.parametrize("config, overrides, expected", [
    ('{"zero_optimization": {"stage": 2},\n "bf16": {"enabled": auto}}', {}, "not valid JSON: Expecting value at line 2"),
    ("[1, 2]", {}, "must hold a JSON object (got list)"),
    ({"zero_optimization": {"stage": 1}}, {}, "zero_optimization.stage must be 2 or 3 (got 1)"),
    ({"bf16": {"enabled": "auto"}}, {}, "zero_optimization.stage must be 2 or 3 (got None)"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, {},
     "remove \"optimizer\" from"),
    ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, {}, "--lr_scheduler choose it"),
    ({"zero_optimization": {"stage": 2}, "train_batch_size": 16}, {}, "set \"train_batch_size\" to \"auto\""),
    ({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8}, {},
     "\"train_micro_batch_size_per_gpu\": 8 in"),
    ({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 2}, {},
     "give --gradient_accumulation_steps 2"),
    ({"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5}, {}, "--max_grad_norm is 1.0"),
    ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, {},
     "fp16.enabled is true in"),
    ({"zero_optimization": {"stage": 3}}, {"q_lora": True}, "use --deepspeed zero2 with --q_lora"),
    ({"zero_optimization": {"stage": 3}}, {"use_lora": False}, "full fine-tuning (--no-use_lora) with ZeRO-3"),
    ({"zero_optimization": {"stage": 2}}, {"save_state": True}, "resumable states (--save_state, --resume)"),
])
def test_config_problems_are_named(tmp_path, config, overrides, expected):
    problems = _problems(tmp_path, config, **overrides)
    assert any(expected in p for p in problems), problems
    assert all(p.startswith(f"--deepspeed {tmp_path / 'ds.json'}") for p in problems)


def test_matching_explicit_values_are_accepted(tmp_path):
    config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
              "gradient_clipping": 1.0, "bf16": {"enabled": True}}
    assert [p for p in _problems(tmp_path, config) if "not installed" not in p] == []


def test_unknown_config_name_lists_the_shipped_ones():
    _, problems = read_deepspeed_config("zero4")
    assert problems == [f"--deepspeed zero4: no such file, and not a shipped config (shipped: zero2, zero3 in "
                        f"{SHIPPED_CONFIGS})"]


def test_vlm_train_refuses_deepspeed_here_before_loading(tmp_path, hide_module):
    import vlm_train
    from library.vlm.tiny import save_tiny_vlm
    from tests.vlm_helpers import shapes_dataset

    hide_module("deepspeed")
    model = save_tiny_vlm(tmp_path / "model", "qwen2_5_vl")
    data = shapes_dataset(tmp_path / "data")
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        vlm_train.main(["--model_local_path", str(model), "--data_path", str(data["train"]), "--image_folder",
                        str(data["folder"]), "--output_dir", str(out), "--deepspeed", "zero3", "--q_lora"])
    message = err.value.message
    for expected in ("--deepspeed zero3 needs the deepspeed package, which is not installed: pip install deepspeed==",
                     "DeepSpeed needs CUDA GPUs and none is available",
                     "use --deepspeed zero2 with --q_lora"):
        assert expected in message, message
    assert not out.exists()


def test_a_plain_python_run_gets_the_launcher_variables(monkeypatch):
    from library.training.deepspeed_setup import single_process_environment

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = single_process_environment()
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert 0 < int(env["MASTER_PORT"]) < 65536
    monkeypatch.setenv("WORLD_SIZE", "2")  # started by a launcher: nothing to add
    assert single_process_environment() == {}


_DRIVER = """
import sys
import library.training.preparation as preparation
if sys.argv[1] != "none":
    preparation.uses_cuda = lambda: True  # DeepSpeed's CPU backend stands in for the GPUs here
import vlm_train
vlm_train.main(sys.argv[2:] + (["--deepspeed", sys.argv[1]] if sys.argv[1] != "none" else []))
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage, accumulation", [("zero2", "3"), ("zero3", "1")])
def test_deepspeed_run_matches_the_plain_loop_on_cpu(tmp_path, stage, accumulation):
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    from library.vlm.tiny import save_tiny_vlm
    from tests.vlm_helpers import shapes_dataset

    model = save_tiny_vlm(tmp_path / "model", "qwen2_5_vl")
    data = shapes_dataset(tmp_path / "data")
    saved = {}
    for name in (stage, "none"):
        argv = ["--model_local_path", str(model), "--data_path", str(data["train"]), "--image_folder",
                str(data["folder"]), "--output_dir", str(tmp_path / name), "--learning_rate", "1e-2",
                "--train_batch_size", "2", "--lora_dropout", "0", "--seed", "0", "--max_train_steps", "8",
                "--gradient_accumulation_steps", accumulation]  # 4 micro-batches an epoch: uneven groups of 3
        result = subprocess.run([sys.executable, "-c", _DRIVER, name, *argv], cwd=Path(__file__).parent.parent,
                                capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        saved[name] = load_file(str(tmp_path / name / "last" / "adapter_model.safetensors"))
    base = load_file(str(tmp_path / "none" / "last" / "adapter_model.safetensors"))
    assert saved[stage].keys() == base.keys() and any("lora_B" in k for k in base)
    assert all(torch.allclose(saved[stage][k], base[k], atol=1e-5) for k in base)
    assert any(float(v.abs().max()) > 0.01 for k, v in base.items() if "lora_B" in k)  # it trained
