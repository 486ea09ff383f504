"""Changing the rank of a LoRA by SVD of each module's delta (``resize_lora.py``).

Each module keeps its scale ``alpha / r`` (the new alpha is ``scale * new rank``, as in sd-scripts), so a resize
to the full rank gives back the same deltas and a lower rank keeps the largest singular values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from library.lora_tools import lowrank
from library.lora_tools.lora_file import LoRAFile, LoRAModuleWeights


@dataclass(frozen=True)
class ResizedModule:
    name: str
    old_rank: int
    new_rank: int
    new_alpha: float
    retained: lowrank.Retained


def resize_lora(
    lora: LoRAFile,
    linear: lowrank.RankChoice,
    conv: lowrank.RankChoice,
    *,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, LoRAModuleWeights], list[ResizedModule]]:
    """New modules (``conv`` rank choice for 3x3 convs, ``linear`` for the rest) and what each kept."""
    out: dict[str, LoRAModuleWeights] = {}
    report: list[ResizedModule] = []
    for name, m in tqdm(sorted(lora.modules.items()), desc="resizing", unit="module"):
        up = lowrank.as_matrix(m.up).to(device, torch.float32) * m.scale
        down = lowrank.as_matrix(m.down).to(device, torch.float32)
        factors = lowrank.svd_of_product(up, down)
        rank = lowrank.select_rank(factors.S, conv if m.is_3x3 else linear)
        new = lowrank.to_module(factors, rank, m.weight_shape, scale=m.scale)
        out[name] = LoRAModuleWeights(new.down.cpu(), new.up.cpu(), new.alpha)
        report.append(ResizedModule(name, m.rank, new.rank, new.alpha, lowrank.retained(factors.S, new.rank)))
    return out, report


def describe(report: list[ResizedModule]) -> str:
    """``--verbose``: per module, the kept share of sum(S) and of the Frobenius norm, and the new rank."""
    lines = []
    for r in report:
        lines.append(
            f"{r.name:75} | rank {r.old_rank} -> {r.new_rank}, alpha {r.new_alpha:g} | sum(S) retained: "
            f"{r.retained.sum_retained:.1%}, fro retained: {r.retained.fro_retained:.1%}, "
            f"max(S) ratio: {r.retained.max_ratio:0.1f}"
        )
    fro = torch.tensor([r.retained.fro_retained for r in report], dtype=torch.float64)
    if fro.numel():
        std = float(fro.std(unbiased=False))
        lines.append(f"Average Frobenius norm retention: {float(fro.mean()):.2%} | std: {std:0.3f}")
    return "\n".join(lines)


def resize_comment(lora: LoRAFile, report: list[ResizedModule], target: str) -> str:
    """``ss_training_comment`` of the result: what was resized (from the largest old rank), then the original
    comment."""
    comment = f"dimension is resized from {max(r.old_rank for r in report)} to {target}"  # as sd-scripts words it
    original = lora.metadata.get("ss_training_comment")
    return f"{comment}; {original}" if original else comment
