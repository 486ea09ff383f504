"""Post-hoc EMA: merge checkpoints saved during one run into an exponential moving average.

Checkpoint ``k`` (0-based, oldest first) is merged into the running average with decay ``beta_k``:
``avg = beta_k * avg + (1 - beta_k) * ckpt_k``; the oldest checkpoint starts the average. With
``--beta``/``--beta2`` the decay goes linearly from ``beta`` (first merge) to ``beta2`` (last merge).
With ``--sigma_rel`` it follows the power-function EMA of Karras et al. (arXiv 2312.02696):
``beta_k = (1 - 1/t)^(gamma + 1)`` at ``t = k + 1``, where ``gamma`` solves
``sigma_rel = sqrt(gamma + 1) / ((gamma + 2) * sqrt(gamma + 3))``.

musubi-tuner evaluates the power function at ``t = k``, which gives the oldest checkpoint weight 0; here
every checkpoint takes part, as the documented "use all epochs" advice assumes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.errors import UserError

MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)  # gamma = 0; larger values have no non-negative gamma


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function exponent ``gamma >= 0`` whose EMA profile has relative width ``sigma_rel``."""
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise UserError(
            f"--sigma_rel {sigma_rel} is out of range: the power-function EMA can only reach "
            f"0 < sigma_rel < {MAX_SIGMA_REL:.4f} (1/sqrt(12)). Smaller values average over fewer recent "
            "checkpoints; try 0.15 to 0.25."
        )
    t = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    real = roots[np.isclose(roots.imag, 0.0) & (roots.real >= 0)].real
    return float(real.max())


def merge_betas(
    num_files: int, beta: float = 0.95, beta2: float | None = None, sigma_rel: float | None = None
) -> list[float]:
    """The decay used when merging each checkpoint after the first (``num_files - 1`` values)."""
    merges = num_files - 1
    if sigma_rel is not None:
        gamma = sigma_rel_to_gamma(sigma_rel)
        return [(1.0 - 1.0 / (k + 1)) ** (gamma + 1.0) for k in range(1, num_files)]
    for name, value in (("--beta", beta), ("--beta2", beta2)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise UserError(f"{name} {value} is out of range: a decay must be between 0 and 1 (e.g. 0.9).")
    end = beta if beta2 is None else beta2
    if merges <= 1:
        return [beta] * merges
    return [beta + (end - beta) * i / (merges - 1) for i in range(merges)]


def effective_weights(betas: list[float]) -> list[float]:
    """Weight of every checkpoint in the result (oldest first); they sum to 1."""
    weights = [1.0]
    for beta in betas:
        weights = [w * beta for w in weights] + [1.0 - beta]
    return weights


@dataclass
class MergeResult:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    order: list[Path]
    weights: list[float]


def order_checkpoints(paths: list[str | os.PathLike], sort: bool = True) -> list[Path]:
    """Check that the files exist and are safetensors; oldest first by modification time unless ``sort`` is off."""
    files = [Path(p) for p in paths]
    problems = [f"{p}: file not found" for p in files if not p.is_file()]
    problems += [f"{p}: not a .safetensors file" for p in files if p.is_file() and p.suffix.lower() != ".safetensors"]
    seen: dict[Path, Path] = {}
    for p in files:
        if p.is_file():
            real = p.resolve()
            if real in seen:
                problems.append(f"{p}: given twice (also as {seen[real]}); each checkpoint counts once")
            seen.setdefault(real, p)
    if problems:
        raise UserError.from_problems("cannot merge these checkpoints", problems)
    if len(files) < 2:
        raise UserError("post-hoc EMA needs at least two checkpoint files from the same run.")
    if sort:
        files.sort(key=lambda p: p.stat().st_mtime)
    return files


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises several types for damaged files
        raise UserError(f"{path}: cannot read it as safetensors ({err}). Is the file complete?") from err
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise UserError(f"{path}: tensor(s) {', '.join(repr(k) for k in broken[:3])}"
                        f"{' ...' if len(broken) > 3 else ''} contain NaN or infinite values, which would make the "
                        "whole average NaN; leave this checkpoint out (the run diverged when it was saved)")
    return tensors


def _read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def merge_checkpoints(files: list[Path], betas: list[float]) -> MergeResult:
    """Average ``files`` (already ordered) with the given per-merge decays, in float32.

    Floating-point tensors are averaged and cast back to their dtype; other tensors come from the first
    file. ``.alpha`` values must agree across files; keys and shapes must match.
    """
    first = _read(files[0])
    dtypes = {k: v.dtype for k, v in first.items()}
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in first.items()}
    for path, beta in zip(files[1:], betas):
        current = _read(path)
        missing = sorted(set(state) - set(current))
        extra = sorted(set(current) - set(state))
        if missing or extra:
            detail = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {extra[:3]}" if extra else "")
            raise UserError(
                f"{path}: its keys differ from {files[0]} ({detail.strip()}). "
                "Post-hoc EMA needs checkpoints of the same network from the same run."
            )
        for key, value in current.items():
            if value.shape != state[key].shape:
                raise UserError(
                    f"{path}: tensor '{key}' has shape {tuple(value.shape)} but {files[0]} has "
                    f"{tuple(state[key].shape)}. Post-hoc EMA needs checkpoints with the same network dim."
                )
            if key.endswith(".alpha"):
                if not torch.allclose(state[key].float(), value.float()):
                    raise UserError(
                        f"{path}: '{key}' is {value.float().item():g} but {files[0]} has "
                        f"{state[key].float().item():g}; all checkpoints must have the same network_alpha."
                    )
                continue
            if not value.is_floating_point():
                continue
            state[key].mul_(beta).add_(value.float(), alpha=1.0 - beta)
    tensors = {k: v.to(dtypes[k]) for k, v in state.items()}
    return MergeResult(tensors, _read_metadata(files[-1]), files, effective_weights(betas))


def describe_weights(files: list[Path], weights: list[float]) -> str:
    """A table of each checkpoint's weight in the result."""
    width = max(len(str(p)) for p in files)
    lines = [f"{'checkpoint':<{width}}  weight"]
    lines += [f"{str(p):<{width}}  {w:.6f}" for p, w in zip(files, weights)]
    return "\n".join(lines)
