"""Low-rank math of the LoRA tools: SVD of a weight delta (dense, or given as a product ``up @ down``), rank
selection (fixed or sd-scripts' ``sv_ratio`` / ``sv_fro`` / ``sv_cumulative``), and back to LoRA factors.

A 3x3 LoCon delta ``[out, in, kh, kw]`` is handled as the matrix ``[out, in * kh * kw]``; the factors become
``down [r, in, kh, kw]`` and ``up [out, r, 1, 1]``, which is exactly how a LoCon module computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from library.lora_tools.lora_file import LoRAModuleWeights

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # below this the delta counts as zero (it gets rank 1, as in sd-scripts)


@dataclass(frozen=True)
class RankChoice:
    """How to pick the rank of one module: at most ``max_rank``, lowered by a dynamic method when given."""

    max_rank: int
    method: str | None = None
    param: float | None = None


@dataclass(frozen=True)
class Factorization:
    """An SVD ``U diag(S) Vh`` of a 2-D matrix (only the non-trivial part: at most the rank of the input)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


@dataclass(frozen=True)
class Retained:
    """What a truncation keeps: its rank and the kept share of sum(S) and of the Frobenius norm."""

    rank: int
    sum_retained: float
    fro_retained: float
    max_ratio: float


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A weight (or delta) as a 2-D matrix: ``[out, in]`` or ``[out, in * kh * kw]``."""
    return t.reshape(t.shape[0], -1)


def svd(matrix: torch.Tensor) -> Factorization:
    """Thin SVD of a dense matrix, in float32 on the matrix's device."""
    U, S, Vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return Factorization(U, S, Vh)


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> Factorization:
    """SVD of ``up @ down`` (``[out, r] @ [r, in]``) without forming it: QR of both factors, then an ``r x r``
    SVD. Exact up to float rounding, and fast for the small ranks of LoRA modules."""
    up, down = up.float(), down.float()
    if up.shape[1] >= min(up.shape[0], down.shape[1]):
        return svd(up @ down)
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    small = svd(r_up @ r_down.T)
    return Factorization(q_up @ small.U, small.S, small.Vh @ q_down.T)


def select_rank(S: torch.Tensor, choice: RankChoice) -> int:
    """The rank to keep: ``choice.max_rank``, or the smallest rank that meets a dynamic target, never above
    ``max_rank`` nor the number of singular values, at least 1 (a zero delta keeps rank 1).

    - ``sv_ratio``: keep the singular values larger than ``S[0] / param``;
    - ``sv_cumulative``: the smallest rank whose ``sum(S[:r]) / sum(S)`` reaches ``param``;
    - ``sv_fro``: the smallest rank whose ``sqrt(sum(S[:r]^2) / sum(S^2))`` reaches ``param``.
    """
    available = int(S.numel())
    if available == 0 or float(S[0]) <= MIN_SV:
        return 1
    if choice.method is None:
        rank = choice.max_rank
    elif choice.method == "sv_ratio":
        rank = int((S > S[0] / choice.param).sum())
    elif choice.method == "sv_cumulative":
        share = torch.cumsum(S, 0) / S.sum()
        rank = int((share < choice.param - 1e-7).sum()) + 1
    elif choice.method == "sv_fro":
        share = torch.sqrt(torch.cumsum(S**2, 0) / (S**2).sum())
        rank = int((share < choice.param - 1e-7).sum()) + 1
    else:
        raise ValueError(f"unknown dynamic method {choice.method!r}")
    return max(1, min(rank, choice.max_rank, available))


def retained(S: torch.Tensor, rank: int) -> Retained:
    """Shares of ``sum(S)`` and of the Frobenius norm kept by the first ``rank`` singular values."""
    total, fro = float(S.sum()), float(S.pow(2).sum())
    if total <= 0:
        return Retained(rank, 1.0, 1.0, 1.0)
    last = float(S[rank - 1]) if rank <= S.numel() else 0.0
    return Retained(
        rank,
        float(S[:rank].sum()) / total,
        (float(S[:rank].pow(2).sum()) / fro) ** 0.5,
        float(S[0]) / last if last > 0 else float("inf"),
    )


def to_module(
    f: Factorization,
    rank: int,
    weight_shape: tuple[int, ...],
    scale: float = 1.0,
    clamp_quantile: float | None = None,
) -> LoRAModuleWeights:
    """LoRA factors of the rank-``rank`` truncation of ``f``, for a weight of ``weight_shape``.

    The module's ``alpha`` is ``scale * rank`` (so its scale is ``scale``) and ``up`` carries the singular values
    divided by ``scale``: ``up @ down * scale`` is the truncation. ``clamp_quantile`` < 1 clamps the entries of
    ``up`` and ``down`` to +-(that quantile of their values), as sd-scripts' extraction does."""
    rank = max(1, min(rank, int(f.S.numel())))
    up = f.U[:, :rank] * (f.S[:rank] / scale)
    down = f.Vh[:rank]
    if clamp_quantile is not None and clamp_quantile < 1:
        values = torch.cat([up.flatten(), down.flatten()])
        step = max(1, values.numel() >> 24)  # torch.quantile takes at most 2**24 values
        limit = float(torch.quantile(values[::step], clamp_quantile))
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    if len(weight_shape) == 4:
        down = down.reshape(rank, *weight_shape[1:])
        up = up.reshape(weight_shape[0], rank, 1, 1)
    return LoRAModuleWeights(down.contiguous(), up.contiguous(), float(scale * rank))
