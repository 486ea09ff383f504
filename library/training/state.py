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
    """Check a state folder is complete, intact and well-formed; returns its validated ``train_state.json``.
    Raises UserError naming the file and the field."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a state folder" if folder.exists() else "no such state folder"
        raise UserError(f"--resume {folder}: {what}")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"--resume {folder}: no {MANIFEST} in the folder, so the state is incomplete (the run was "
                        "probably stopped while saving it) or not a state of this trainer; resume from an "
                        "earlier state folder")
    files = _read_json(manifest_path).get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise UserError(f"--resume {folder}: {manifest_path}: field 'files' must map file names to checksums; "
                        "resume from another state")
    problems = []
    for name, digest in files.items():
        path = folder / name
        if Path(name).name != name:
            problems.append(f"{name}: not a file name of the state folder")
        elif not path.is_file():
            problems.append(f"{name} is missing")
        elif file_sha256(path) != digest:
            problems.append(f"{name} does not match its checksum (corrupt or modified)")
    for name in (PROGRESS, WEIGHTS, OPTIMIZER, SCHEDULER):
        if name not in files:
            problems.append(f"{name} is not listed in {MANIFEST}")
    if problems:
        raise UserError.from_problems(f"--resume {folder}: the state is damaged; resume from another state",
                                      problems)
    info = _read_json(folder / PROGRESS)
    problems = progress_problems(info)
    if problems:
        raise UserError.from_problems(f"--resume {folder}: {folder / PROGRESS} has invalid fields; resume from "
                                      "another state", problems)
    return info


# field -> (accepted types, required, minimum); other fields are kept as they are
PROGRESS_FIELDS: dict[str, tuple[tuple[type, ...], bool, int | None]] = {
    "format": ((int,), True, 1),
    "num_processes": ((int,), True, 1),
    "epoch": ((int,), True, 0),
    "global_step": ((int,), True, 0),
    "batches_done": ((int,), True, 0),
    "seed": ((int,), False, 0),
    "recipe": ((str,), False, None),
    "output_name": ((str,), False, None),
    "optimizer": ((str,), False, None),
    "dataset": ((str,), False, None),
    "saved_at": ((int, float), False, 0),
}


def progress_problems(info: Any) -> list[str]:
    """Every field of a ``train_state.json`` with the wrong type or range, each naming the field."""
    if not isinstance(info, dict):
        return [f"expected a JSON object, found {type(info).__name__}"]
    problems = []
    for key, (types, required, minimum) in PROGRESS_FIELDS.items():
        if key not in info:
            if required:
                problems.append(f"field '{key}' is missing")
            continue
        value = info[key]
        if isinstance(value, bool) or not isinstance(value, types):
            problems.append(f"field '{key}' must be {_type_words(types)}, found {json.dumps(value)}")
        elif minimum is not None and value < minimum:
            problems.append(f"field '{key}' must be at least {minimum}, found {value}")
    return problems


def _type_words(types: tuple[type, ...]) -> str:
    return {(int,): "an integer", (str,): "a string", (int, float): "a number"}[types]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise UserError(f"--resume: {path} is unreadable ({err}); resume from another state") from None
    if not isinstance(value, dict):
        raise UserError(f"--resume: {path} must hold a JSON object; resume from another state")
    return value


def check_process_count(folder: str | Path, saved: int, current: int) -> None:
    """A state resumes only with the number of processes that saved it (UserError otherwise)."""
    if saved != current:
        raise UserError(f"--resume {folder}: the state was saved by {saved} process(es) but this run has {current}; "
                        "each process's data position and random streams are stored, so resume with "
                        f"--num_processes {saved}")


def check_position(folder: str | Path, info: dict[str, Any], *, max_train_steps: int, batches_per_epoch: int) -> None:
    """The saved position must fit this run (before any model loads): a state at or past ``max_train_steps``
    has nothing left to train, and ``batches_done`` cannot exceed an epoch of this dataset."""
    step = info["global_step"]
    if step >= max_train_steps:
        raise UserError(f"--resume {folder}: the state is at step {step} and this run ends at step {max_train_steps}"
                        f", so there is nothing left to train (the state's weights are already the result); raise "
                        f"--max_train_steps above {step} (or --max_train_epochs) to continue training")
    if info["batches_done"] > batches_per_epoch:
        raise UserError(f"--resume {folder}: {PROGRESS} field 'batches_done' is {info['batches_done']} but an epoch "
                        f"of this dataset has {batches_per_epoch} batches per process; the state belongs to another "
                        "dataset or was edited, resume from another state")


def load_state(folder: str | Path, *, process_index: int, num_processes: int) -> LoadedState:
    """Read a verified state folder for this process. Raises UserError when it cannot be used."""
    folder = Path(folder)
    info = verify_state(folder)
    if info["format"] != STATE_FORMAT:
        raise UserError(f"--resume {folder}: state format {info['format']} is not supported "
                        f"(this version writes {STATE_FORMAT})")
    check_process_count(folder, info["num_processes"], num_processes)
    try:
        weights = load_file(str(folder / WEIGHTS))
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise UserError(f"--resume {folder}: {folder / WEIGHTS} is not a valid safetensors file ({err})") from None
    scaler_path = folder / SCALER
    return LoadedState(
        progress=Progress(info["epoch"], info["global_step"], info["batches_done"]),
        weights=weights,
        optimizer=_load_part(folder / OPTIMIZER, _optimizer_problem),
        scheduler=_load_part(folder / SCHEDULER, _dict_problem),
        scaler=_load_part(scaler_path, _dict_problem) if scaler_path.exists() else None,
        rng=_load_part(folder / f"rng_{process_index}.pt", _rng_problem),
        info=info,
    )


def _load_part(path: Path, problem: Any) -> Any:
    """A ``torch.load(weights_only=True)`` part of a state, checked by ``problem(value) -> str | None``."""
    from library.models.weights import load_pickle

    if not path.is_file():
        raise UserError(f"--resume {path.parent}: {path.name} is missing; resume from another state")
    try:
        value = load_pickle(path, what="state file", advice="Resume from another state.")
    except UserError as err:
        raise UserError(f"--resume {path.parent}: {err.message}") from None
    why = problem(value)
    if why:
        raise UserError(f"--resume {path.parent}: {path} {why}; resume from another state")
    return value


def _dict_problem(value: Any) -> str | None:
    return None if isinstance(value, dict) else f"must hold a dictionary, found {type(value).__name__}"


def _optimizer_problem(value: Any) -> str | None:
    if not isinstance(value, dict):
        return _dict_problem(value)
    if not isinstance(value.get("state"), dict):
        return "has no field 'state' (a dictionary): it is not an optimizer state"
    if not isinstance(value.get("param_groups"), list) or not all(isinstance(g, dict) for g in value["param_groups"]):
        return "has no field 'param_groups' (a list of dictionaries): it is not an optimizer state"
    return None


def _rng_problem(value: Any) -> str | None:
    if not isinstance(value, dict):
        return _dict_problem(value)
    for key in ("torch", "numpy_keys", "noise_generator"):
        if not isinstance(value.get(key), torch.Tensor):
            return f"field '{key}' must be a tensor"
    rest, py = value.get("numpy_rest"), value.get("python")
    if not (isinstance(rest, list) and len(rest) == 3):
        return "field 'numpy_rest' must be a list of 3 numbers"
    if not (isinstance(py, list) and len(py) == 3 and isinstance(py[1], list)):
        return "field 'python' must be [version, state list, gauss]"
    return None
