"""What the training benchmarks share: generated images, the timed part of a run, and one case per process.

Each case runs in its own process (so peak memory does not mix between cases) and prints one ``RESULT {json}``
line; :func:`run_case` starts it and reads that line back.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


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


def run_case(argv: list[str]) -> dict[str, Any] | None:
    """Run ``python <argv>`` from the repository root and return its ``RESULT`` (None, with its stderr printed,
    when it failed)."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def memory_variants(network_script: str, full_script: str, swap_blocks: int) -> dict[str, tuple[str, list[str], bool]]:
    """The memory-option variants of a transformer family's training benches: name -> (script, extra options,
    runs on the CPU). Block swap and CPU offload need CUDA."""
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

