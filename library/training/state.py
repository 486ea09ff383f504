"""Resumable training state: trained weights, optimizer, LR scheduler, grad scaler, every process's RNG
streams, and the exact position (epoch, optimizer step, micro-batches consumed in the epoch).

A state folder is written into ``.<name>.partial`` and renamed into place once complete; its
``manifest.json`` (written last) lists the SHA-256 of every file. A folder without a manifest, with a
missing file or a wrong checksum is refused when resuming, so a run killed while saving never resumes from
half a state.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.io_utils import atomic_write_json, file_sha256, match_umask

STATE_FORMAT = 1
MANIFEST = "manifest.json"
PROGRESS = "train_state.json"
WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
SCALER = "scaler.pt"


@dataclass
class Progress:
    """Where a run is: ``epoch`` (0-based, the epoch in progress), ``global_step`` (optimizer steps done)
    and ``batches_done`` (micro-batches of ``epoch`` this process has consumed)."""

    epoch: int = 0
    global_step: int = 0
    batches_done: int = 0


@dataclass
class LoadedState:
    progress: Progress
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


def capture_rng() -> dict[str, Any]:
    """This process's RNG streams (torch CPU and CUDA, numpy, python) in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": _python_state_to_list(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def save_state(
    folder: str | Path,
    accelerator: Any,
    *,
    progress: Progress,
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    scaler: dict[str, Any] | None,
    rng: dict[str, Any],
    info: dict[str, Any],
) -> Path:
    """Write a state folder atomically. Every process must call this (each writes its own RNG file);
    the main process writes the rest, the manifest, and renames the folder into place."""
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.partial"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng, tmp / f"rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
        torch.save(optimizer, tmp / OPTIMIZER)
        torch.save(scheduler, tmp / SCHEDULER)
        if scaler is not None:
            torch.save(scaler, tmp / SCALER)
        meta = {"format": STATE_FORMAT, "num_processes": accelerator.num_processes, **asdict(progress), **info}
        (tmp / PROGRESS).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        match_umask(tmp)
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        atomic_write_json(tmp / MANIFEST, {"format": STATE_FORMAT, "files": files})
        if folder.exists():
            old = folder.parent / f".{folder.name}.old"
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    accelerator.wait_for_everyone()
    return folder


def verify_state(folder: str | Path) -> dict[str, Any]:
    """Check a state folder is complete and intact; returns its ``train_state.json``. Raises UserError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--resume {folder}: no such state folder")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"--resume {folder}: no {MANIFEST} in the folder, so the state is incomplete (the run was "
                        "probably stopped while saving it) or not a state of this trainer; resume from an "
                        "earlier state folder")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        raise UserError(f"--resume {folder}: {MANIFEST} is unreadable ({err}); resume from another state") from None
    problems = []
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif file_sha256(path) != digest:
            problems.append(f"{name} does not match its checksum (corrupt or modified)")
    if problems:
        raise UserError.from_problems(f"--resume {folder}: the state is damaged; resume from another state",
                                      problems)
    return json.loads((folder / PROGRESS).read_text(encoding="utf-8"))


def check_process_count(folder: str | Path, saved: int, current: int) -> None:
    """A state resumes only with the number of processes that saved it (UserError otherwise)."""
    if saved != current:
        raise UserError(f"--resume {folder}: the state was saved by {saved} process(es) but this run has {current}; "
                        "each process's data position and random streams are stored, so resume with "
                        f"--num_processes {saved}")


def load_state(folder: str | Path, *, process_index: int, num_processes: int) -> LoadedState:
    """Read a verified state folder for this process. Raises UserError when it cannot be used."""
    folder = Path(folder)
    info = verify_state(folder)
    if info.get("format") != STATE_FORMAT:
        raise UserError(f"--resume {folder}: state format {info.get('format')} is not supported "
                        f"(this version writes {STATE_FORMAT})")
    check_process_count(folder, info["num_processes"], num_processes)
    scaler_path = folder / SCALER
    return LoadedState(
        progress=Progress(info["epoch"], info["global_step"], info["batches_done"]),
        weights=load_file(str(folder / WEIGHTS)),
        optimizer=torch.load(folder / OPTIMIZER, weights_only=True),
        scheduler=torch.load(folder / SCHEDULER, weights_only=True),
        scaler=torch.load(scaler_path, weights_only=True) if scaler_path.exists() else None,
        rng=torch.load(folder / f"rng_{process_index}.pt", weights_only=True),
        info=info,
    )
