"""What the training benchmarks share: generated images, the options of a cached run, the timed part of a run, and
the memory-option variants. How the cases run (one process each) is in bench/cases.py.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any


def write_images(folder: Path, resolution: int, caption: str = "a photo {i}") -> Path:
    """Four random square images with ``.caption`` files (``caption`` formatted with ``i``) in ``folder``."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.caption").write_text(caption.format(i=i), encoding="utf-8")
    return folder


def write_dataset_toml(work: Path, resolution: int) -> Path:
    """A batch-1 dataset config over :func:`write_images` of ``work/images_<resolution>``."""
    images = write_images(work / f"images_{resolution}", resolution)
    toml = work / f"data_{resolution}.toml"
    toml.write_text(f"[general]\nresolution = {resolution}\nbatch_size = 1\n[[datasets]]\n[[datasets.subsets]]\n"
                    f"image_dir = '{images.as_posix()}'\n", encoding="utf-8")
    return toml


def timed_training(run: Any, steps: int) -> dict[str, Any]:
    """Train 2 warm-up steps, then ``steps`` timed ones; seconds per step and peak memory (process RSS on CPU,
    ``torch.cuda.max_memory_allocated`` on CUDA)."""
    import torch

    from library.training.loop import train

    cuda = torch.cuda.is_available()
    train(run)  # warm-up (the run's own max_train_steps, 2)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    run.max_train_steps = steps
    start = time.perf_counter()
    train(run)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"device": "cuda" if cuda else "cpu", "steps": steps, "seconds_per_step": elapsed / steps,
            "peak_memory_mib": peak / 2**20, "memory_kind": "cuda allocated" if cuda else "process RSS",
            "threads": torch.get_num_threads()}


def prepare_run(script: ModuleType, recipe: Callable[[argparse.Namespace], Any], support: Any,
                families: tuple[str, ...], argv: list[str]) -> Any:
    """The run a training script would make of ``argv``: its parser (``script.build_parser()``, ``--config_file``
    applied), then ``prepare_training`` with ``recipe(args)``."""
    from library.config.run_config import load_run_config
    from library.training.loop import prepare_training

    args = load_run_config(script.build_parser(), argv)
    return prepare_training(args, recipe(args), support, families=families)


def transformer_case(name: str, variant: str, resolution: int, steps: int, work: Path, *,
                     variants: Mapping[str, tuple[str, list[str], bool]], full_script: str, model_argv: list[str],
                     prepare: Callable[[str, list[str]], Any], kind: str = "variant") -> dict[str, Any]:
    """One timed case of a transformer family's bench. The run's options: the model's (``model_argv``), the
    dataset of :func:`write_dataset_toml`, the case's own output folder, latents and text outputs cached, 2 steps
    (the warm-up), seed 0, no loader workers, bf16 on CUDA (and ``--full_bf16`` for ``full_script``), then the
    variant's own; ``prepare(script, argv)`` makes the run of the variant's script. The result names the variant
    under ``kind``."""
    import torch

    cuda = torch.cuda.is_available()
    script, extra, _ = variants[variant]
    toml = write_dataset_toml(work, resolution)
    argv = [*model_argv, "--dataset_config", str(toml), "--output_dir",
            str(work / f"out_{name}_{variant}_{resolution}"), "--overwrite", "--cache_latents",
            "--cache_text_encoder_outputs", "--learning_rate", "1e-4", "--max_train_steps", "2", "--seed", "0",
            "--max_data_loader_n_workers", "0", "--mixed_precision", "bf16" if cuda else "no", *extra,
            *(["--full_bf16"] if cuda and script == full_script else [])]
    run = prepare(script, argv)
    params = sum(p.numel() for p in run.models.unet.parameters())
    return {"model": name, kind: variant, "resolution": resolution, "transformer_parameters": params,
            **timed_training(run, steps)}


def memory_variants(network_script: str, full_script: str, swap_blocks: int) -> dict[str, tuple[str, list[str], bool]]:
    """The memory-option variants of a transformer family's training benches: name -> (script, extra options,
    runs on the CPU). Block swap and CPU offload need CUDA.

      lora           ``network_script``, LoRA rank 16 on the denoiser (the reference)
      lora_ckpt      + --gradient_checkpointing
      lora_fp8       + --fp8_base (frozen Linear weights in float8)
      lora_swap      + --gradient_checkpointing --blocks_to_swap ``swap_blocks`` (CUDA only)
      lora_offload   + --gradient_checkpointing --cpu_offload_checkpointing (CUDA only)
      full_blockwise ``full_script``, AdamW, --blockwise_fused_optimizers
      full_swap      ``full_script``, AdaFactor --fused_backward_pass --gradient_checkpointing --blocks_to_swap
                     ``swap_blocks`` (CUDA only)
    """
    lora = ["--network_dim", "16", "--network_train_unet_only"]
    ckpt = ["--gradient_checkpointing"]
    swap = ["--blocks_to_swap", str(swap_blocks)]
    return {
        "lora": (network_script, lora, True),
        "lora_ckpt": (network_script, lora + ckpt, True),
        "lora_fp8": (network_script, lora + ["--fp8_base"], True),
        "lora_swap": (network_script, lora + ckpt + swap, False),
        "lora_offload": (network_script, lora + ckpt + ["--cpu_offload_checkpointing"], False),
        "full_blockwise": (full_script, ["--optimizer_type", "AdamW", "--blockwise_fused_optimizers"], True),
        "full_swap": (full_script, ["--optimizer_type", "AdaFactor", "--fused_backward_pass", "--optimizer_args",
                                    "relative_step=False", "scale_parameter=False", "warmup_init=False",
                                    *swap, *ckpt], False),
    }

