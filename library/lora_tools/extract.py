"""Extracting a LoRA from the difference of two checkpoints (``extract_lora_from_models.py``).

For every LoRA target of the family (LoCon convs too with a conv rank), the delta ``tuned - original`` is
factorized by SVD to ``--dim`` (``--conv_dim`` for 3x3 convs), clamped at ``--clamp_quantile`` and stored with
alpha = rank (scale 1), as sd-scripts does. Each text encoder (``lora_te``, SDXL's ``lora_te1``/``lora_te2``) is
included only when one of its weights differs by more than ``--min_diff``. A fused FLUX layer (``qkv``) is
extracted from its parts stacked on rows, as sd-scripts' LoRA sits on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm import tqdm

from library.errors import UserError
from library.lora_tools import lowrank
from library.lora_tools.lora_file import LoRAModuleWeights
from library.lora_tools.targets import ModelForLoRA, fused_shape, fused_weight

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractSettings:
    dim: int
    conv_dim: int | None
    clamp_quantile: float
    min_diff: float


Pair = tuple[tuple[torch.nn.Module, ...], tuple[torch.nn.Module, ...]]


def _pairs(org: ModelForLoRA, tuned: ModelForLoRA, conv_blocks: bool) -> dict[str, Pair]:
    a, b = org.targets(conv_blocks), tuned.targets(conv_blocks)
    differ = sorted(set(a) ^ set(b))
    differ += [n for n in a if n in b and fused_shape(a[n]) != fused_shape(b[n])]
    if differ:
        raise UserError(
            f"{org.source} and {tuned.source} are not the same architecture ({len(differ)} LoRA targets differ, "
            f"e.g. {', '.join(differ[:3])}); extract from a model and its fine-tune"
        )
    return {n: (a[n], b[n]) for n in a}


def _text_encoder(name: str) -> str | None:
    """``lora_te`` / ``lora_te1`` / ``lora_te2`` / ``lora_te3`` of a text encoder module, None for the denoiser."""
    return name.split("_")[1] if name.startswith("lora_te") else None


def _changed_text_encoders(pairs: dict[str, Pair], min_diff: float, device) -> set[str]:
    """The text encoders with a weight that differs by more than ``min_diff``."""
    largest: dict[str, float] = {}
    for name, (m_org, m_tuned) in pairs.items():
        part = _text_encoder(name)
        if part is None or largest.get(part, 0.0) > min_diff:
            continue
        diff = fused_weight(m_tuned, device) - fused_weight(m_org, device)
        largest[part] = max(largest.get(part, 0.0), float(diff.abs().max()))
    for part, value in sorted(largest.items()):
        verdict = "differs: extracted" if value > min_diff else "is the same: skipped"
        logger.info("text encoder %s %s (largest difference %g, --min_diff %g)", part, verdict, value, min_diff)
    return {part for part, value in largest.items() if value > min_diff}


@torch.no_grad()
def extract_lora(
    org: ModelForLoRA, tuned: ModelForLoRA, settings: ExtractSettings, *, device: str | torch.device = "cpu"
) -> dict[str, LoRAModuleWeights]:
    """The extracted modules, by standard kohya name."""
    pairs = _pairs(org, tuned, conv_blocks=settings.conv_dim is not None)
    changed = _changed_text_encoders(pairs, settings.min_diff, device)
    pairs = {n: p for n, p in pairs.items() if _text_encoder(n) in changed or _text_encoder(n) is None}
    out: dict[str, LoRAModuleWeights] = {}
    for name, (m_org, m_tuned) in tqdm(sorted(pairs.items()), desc="extracting (SVD)", unit="module"):
        delta = fused_weight(m_tuned, device) - fused_weight(m_org, device)
        is_3x3 = delta.dim() == 4 and tuple(delta.shape[2:]) != (1, 1)
        rank = settings.conv_dim if is_3x3 and settings.conv_dim is not None else settings.dim
        factors = lowrank.svd(lowrank.as_matrix(delta))
        module = lowrank.to_module(
            factors, min(rank, int(factors.S.numel())), tuple(delta.shape), clamp_quantile=settings.clamp_quantile
        )
        out[name] = LoRAModuleWeights(module.down.cpu(), module.up.cpu(), module.alpha)
    return out
