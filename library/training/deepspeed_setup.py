"""DeepSpeed ZeRO-2 / ZeRO-3 through accelerate for a recipe on the toolkit's loop (``vlm_train.py --deepspeed``).

``--deepspeed`` names a JSON config: a shipped one (``zero2`` / ``zero3``, files in ``library/vlm/ds_configs``) or a
file of the user's. The loop keeps what it owns: gradient accumulation (DeepSpeed's own is set to 1 and the loop
marks the last micro-batch of each optimizer step), the learning-rate schedule and the optimizer choice. DeepSpeed
averages and clips the gradients, shards the optimizer state (ZeRO-2) and the weights too (ZeRO-3), and steps.
Every problem of the config and of its combination with the other options is reported before any model loads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "vlm" / "ds_configs"
DEEPSPEED_HINT = "pip install deepspeed==0.19.8 (it builds its CUDA kernels against the installed CUDA toolkit)"
STAGES = (2, 3)
# entries the command line decides: "auto" (or left out) takes the option's value
FROM_OPTIONS = {"train_micro_batch_size_per_gpu": "--train_batch_size",
                "gradient_accumulation_steps": "--gradient_accumulation_steps",
                "gradient_clipping": "--max_grad_norm"}
OWNED = {"optimizer": "--optimizer_type / --learning_rate", "scheduler": "--lr_scheduler"}


@dataclass(frozen=True)
class DeepSpeedSettings:
    """A checked DeepSpeed config: where it came from and its content."""

    path: Path
    config: dict[str, Any]

    @property
    def stage(self) -> int:
        return int(self.config["zero_optimization"]["stage"])


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.json"))


def resolve_config_path(value: str) -> Path | None:
    """A file path, or a shipped config by name (``zero2``, ``zero3.json``); None when neither exists."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    shipped = SHIPPED_CONFIGS / (path.name if path.suffix == ".json" else f"{path.name}.json")
    return shipped if path.parent == Path(".") and shipped.is_file() else None


def read_deepspeed_config(value: str) -> tuple[DeepSpeedSettings | None, list[str]]:
    """The config named by ``--deepspeed`` and the problems of its content (one message each)."""
    flag = f"--deepspeed {value}"
    path = resolve_config_path(value)
    if path is None:
        return None, [f"{flag}: no such file, and not a shipped config (shipped: {', '.join(shipped_names())} "
                      f"in {SHIPPED_CONFIGS})"]
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        return None, [f"{flag}: {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"]
    except (OSError, UnicodeDecodeError) as err:
        return None, [f"{flag}: cannot read {path} ({err})"]
    if not isinstance(config, dict):
        return None, [f"{flag}: {path} must hold a JSON object (got {type(config).__name__})"]
    stage = config.get("zero_optimization", {}).get("stage") if isinstance(config.get("zero_optimization"),
                                                                         dict) else None
    problems = []
    if stage not in STAGES:
        problems.append(f"{flag}: zero_optimization.stage must be 2 or 3 (got {stage!r}) in {path}")
    for key, option in OWNED.items():
        if key in config:
            problems.append(f"{flag}: remove \"{key}\" from {path}; the toolkit's {option} choose it")
    if config.get("train_batch_size", "auto") != "auto":
        problems.append(f"{flag}: set \"train_batch_size\" to \"auto\" in {path} (it is --train_batch_size × "
                        "--gradient_accumulation_steps × processes)")
    return (DeepSpeedSettings(path, config) if stage in STAGES else None), problems


def option_value(args: argparse.Namespace, key: str) -> Any:
    """The command line's value of a config entry listed in FROM_OPTIONS."""
    name = FROM_OPTIONS[key].lstrip("-")
    return getattr(args, name) or 0.0 if key == "gradient_clipping" else getattr(args, name)


def deepspeed_problems(args: argparse.Namespace, *, cuda: bool) -> tuple[DeepSpeedSettings | None, list[str]]:
    """The checked settings of ``--deepspeed`` (None without it) and every problem of the config, of its
    combination with the other options and of this machine (deepspeed missing, no CUDA)."""
    if not getattr(args, "deepspeed", None):
        return None, []
    settings, problems = read_deepspeed_config(args.deepspeed)
    flag = f"--deepspeed {args.deepspeed}"
    if importlib.util.find_spec("deepspeed") is None:
        problems.append(f"{flag} needs the deepspeed package, which is not installed: {DEEPSPEED_HINT}; or train "
                        "without --deepspeed (--q_lora and --gradient_checkpointing also save memory)")
    if not cuda:
        problems.append(f"{flag}: DeepSpeed needs CUDA GPUs and none is available; on the CPU train without "
                        "--deepspeed (`accelerate launch --multi_gpu` without it runs data parallel)")
    if args.save_state or args.resume:
        problems.append(f"{flag}: resumable states (--save_state, --resume) are not written with DeepSpeed, whose "
                        "optimizer state is sharded over the processes; drop them or train without --deepspeed")
    if settings is None:
        return None, problems
    for key, option in FROM_OPTIONS.items():
        value = settings.config.get(key, "auto")
        if value != "auto" and value != option_value(args, key):
            problems.append(f"{flag}: \"{key}\": {value} in {settings.path} but {option} is "
                            f"{option_value(args, key)}; set it to \"auto\" or give {option} {value}")
    for precision in ("fp16", "bf16"):
        enabled = settings.config.get(precision, {}).get("enabled", "auto")
        if enabled is True and args.mixed_precision != precision:
            problems.append(f"{flag}: {precision}.enabled is true in {settings.path} but --mixed_precision is "
                            f"{args.mixed_precision}; set it to \"auto\" or give --mixed_precision {precision}")
    if settings.stage == 3 and getattr(args, "q_lora", False):
        problems.append(f"{flag}: ZeRO-3 shards the weights, which 4-bit QLoRA weights cannot be; use "
                        f"--deepspeed zero2 with --q_lora")
    if settings.stage == 3 and not getattr(args, "use_lora", True):
        problems.append(f"{flag}: full fine-tuning (--no-use_lora) with ZeRO-3 is not supported (its saves would "
                        "need the sharded weights gathered); use --deepspeed zero2")
    return settings, problems


def deepspeed_config_for_run(settings: DeepSpeedSettings, args: argparse.Namespace, num_processes: int,
                             hidden_size: int) -> dict[str, Any]:
    """The config handed to DeepSpeed: the batch entries filled in, accumulation left to the loop (1 here), and
    the "auto" bucket sizes from the language model's ``hidden_size`` (accelerate would look for it in the
    model's top-level config, which a VLM's config does not have)."""
    config = json.loads(json.dumps(settings.config))
    config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = args.train_batch_size * num_processes
    config["gradient_clipping"] = option_value(args, "gradient_clipping")
    sizes = {"reduce_bucket_size": hidden_size * hidden_size,
             "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
             "stage3_param_persistence_threshold": 10 * hidden_size}
    zero = config["zero_optimization"]
    zero.update({key: value for key, value in sizes.items() if zero.get(key) == "auto"})
    return config


def deepspeed_plugin(settings: DeepSpeedSettings, args: argparse.Namespace, num_processes: int,
                     hidden_size: int) -> Any:
    """accelerate's DeepSpeedPlugin for the run (mixed precision "auto" entries are filled by accelerate)."""
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=deepspeed_config_for_run(settings, args, num_processes, hidden_size),
                           gradient_accumulation_steps=1, gradient_clipping=option_value(args, "gradient_clipping"),
                           zero_stage=settings.stage)


def single_process_environment() -> dict[str, str]:
    """The rendezvous variables a launcher sets, for a run started with plain ``python`` (one process): without
    them DeepSpeed looks for MPI. Empty when a launcher started the run."""
    if "WORLD_SIZE" in os.environ:
        return {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
