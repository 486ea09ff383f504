"""Helpers for the trainer tests: tiny datasets on disk, argument lists, in-process and subprocess runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, count: int = 2, size: tuple[int, int] = (64, 64), caption: str = "sks, a photo",
                extension: str = ".caption", seed: int = 0) -> Path:
    """``count`` generated images (gradient + noise + a colored square) with caption files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(count):
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
        arr = (base * 0.6 + rng.integers(0, 80, (h, w, 3))).clip(0, 255).astype("uint8")
        arr[h // 4 : h // 2, w // 4 : w // 2] = rng.integers(0, 255, 3)
        Image.fromarray(arr, "RGB").save(folder / f"img{i}.png")
        (folder / f"img{i}{extension}").write_text(f"{caption} {i}", encoding="utf-8")
    return folder


def dreambooth_dir(root: Path, count: int = 2, repeats: int = 1, **kwargs: Any) -> Path:
    """An old-style ``train_data_dir`` with one ``<repeats>_sks thing`` subfolder; returns train_data_dir."""
    make_images(root / f"{repeats}_sks thing", count=count, **kwargs)
    return root


def dataset_toml(path: Path, image_dir: Path, *, resolution: int = 64, batch_size: int = 2, repeats: int = 1,
                 extra_subset: str = "", extra_general: str = "") -> Path:
    path.write_text(
        f"[general]\nresolution = {resolution}\nbatch_size = {batch_size}\n{extra_general}\n"
        f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{image_dir.as_posix()}'\nnum_repeats = {repeats}\n"
        f"{extra_subset}\n",
        encoding="utf-8",
    )
    return path


def train_args(model: Path, out: Path, *, data: Path | None = None, config: Path | None = None,
               steps: int = 4, name: str = "lora", extra: list[str] | None = None) -> list[str]:
    """A small, fast, deterministic train_network.py command line."""
    argv = ["--pretrained_model_name_or_path", str(model), "--output_dir", str(out), "--output_name", name,
            "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3", "--seed", "1",
            "--max_train_steps", str(steps), "--max_data_loader_n_workers", "0"]
    if config is not None:
        argv += ["--dataset_config", str(config)]
    if data is not None:
        argv += ["--train_data_dir", str(data), "--resolution", "64", "--train_batch_size", "2"]
    return argv + list(extra or [])


def run_main(argv: list[str], script: str = "train_network") -> Path | None:
    """``<script>.main(argv)`` in this process (one torch thread: much faster on the shared CPU)."""
    import importlib

    import torch

    torch.set_num_threads(1)
    return importlib.import_module(script).main(argv)


def prepare_run(argv: list[str], *, script: str = "train_network", recipe: Any = None,
                families: tuple[str, ...] = ("sd",)) -> Any:
    """A prepared :class:`library.training.preparation.Run` (models loaded, nothing trained yet) for a LoRA
    script; ``recipe`` is its recipe class (default :class:`LoRARecipe`)."""
    import importlib

    import torch

    from library.config.arguments import SUPPORT_TRAIN_NETWORK
    from library.config.run_config import load_run_config
    from library.training.loop import prepare_training
    from library.training.recipes import LoRARecipe

    torch.set_num_threads(1)
    args = load_run_config(importlib.import_module(script).build_parser(), argv)
    return prepare_training(args, (recipe or LoRARecipe)(args), SUPPORT_TRAIN_NETWORK, families=families)


def run_script(argv: list[str], *, processes: int = 0, timeout: float = 300,
               script: str = "train_network.py") -> subprocess.CompletedProcess:
    """Run the script in a subprocess: ``python script`` (processes=0) or
    ``accelerate launch --multi_gpu --num_processes N script`` (accelerate 1.15 starts a single process for
    ``--cpu --num_processes N`` without mpirun; ``--multi_gpu`` on a machine without CUDA runs N CPU processes)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if processes:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(29500 + os.getpid() % 1000), str(ROOT / script), *argv]
    else:
        cmd = [sys.executable, str(ROOT / script), *argv]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def load_lora(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors and metadata of a saved LoRA file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
