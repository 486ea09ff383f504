"""vlm_train.py --deepspeed: the shipped ZeRO-2/3 configs, the accelerate DeepSpeedPlugin built from them, every
config problem named before any model loads, and the refusal where deepspeed or CUDA is missing. (A DeepSpeed
training run needs CUDA GPUs; it is not run here.)"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

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
    config = deepspeed_config_for_run(settings, args, num_processes=4)
    # the loop accumulates (DeepSpeed's own accumulation stays 1), the batch entries come from the options
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (2, 1, 8, 1.0)
    assert settings.config["train_batch_size"] == "auto"  # the shipped file is untouched
    plugin = deepspeed_plugin(settings, args, num_processes=4)
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
