"""Extracting a LoRA from the difference of two checkpoints (``extract_lora_from_models.py``).

For every LoRA target of the family (LoCon convs too with a conv rank), the delta ``tuned - original`` is
factorized by SVD to ``--dim`` (``--conv_dim`` for 3x3 convs), clamped at ``--clamp_quantile`` and stored with
alpha = rank (scale 1), as sd-scripts does. Text encoders are included only when one of their weights differs
by more than ``--min_diff``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm import tqdm

from library.errors import UserError
from library.lora_tools import lowrank
from library.lora_tools.lora_file import LoRAModuleWeights
from library.lora_tools.targets import ModelForLoRA

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractSettings:
    dim: int
    conv_dim: int | None
    clamp_quantile: float
    min_diff: float


def _pairs(org: ModelForLoRA, tuned: ModelForLoRA, conv_blocks: bool) -> dict[str, tuple[torch.nn.Module, ...]]:
    a, b = org.targets(conv_blocks), tuned.targets(conv_blocks)
    differ = sorted(set(a) ^ set(b))
    differ += [n for n in a if n in b and a[n].weight.shape != b[n].weight.shape]
    if differ:
        raise UserError(
            f"{org.source} and {tuned.source} are not the same architecture ({len(differ)} LoRA targets differ, "
            f"e.g. {', '.join(differ[:3])}); extract from a model and its fine-tune"
        )
    return {n: (a[n], b[n]) for n in a}


def _text_encoder_differs(pairs: dict[str, tuple[torch.nn.Module, ...]], min_diff: float, device) -> bool:
    largest = 0.0
    for name, (m_org, m_tuned) in pairs.items():
        if not name.startswith("lora_te"):
            continue
        diff = m_tuned.weight.to(device, torch.float32) - m_org.weight.to(device, torch.float32)
        largest = max(largest, float(diff.abs().max()))
        if largest > min_diff:
            logger.info("text encoder differs (%g > --min_diff %g): extracting it too", largest, min_diff)
            return True
    logger.info("text encoder is the same (largest difference %g <= --min_diff %g): UNet only", largest, min_diff)
    return False


@torch.no_grad()
def extract_lora(
    org: ModelForLoRA, tuned: ModelForLoRA, settings: ExtractSettings, *, device: str | torch.device = "cpu"
) -> dict[str, LoRAModuleWeights]:
    """The extracted modules, by standard kohya name."""
    pairs = _pairs(org, tuned, conv_blocks=settings.conv_dim is not None)
    if not _text_encoder_differs(pairs, settings.min_diff, device):
        pairs = {n: p for n, p in pairs.items() if not n.startswith("lora_te")}
    out: dict[str, LoRAModuleWeights] = {}
    for name, (m_org, m_tuned) in tqdm(sorted(pairs.items()), desc="extracting (SVD)", unit="module"):
        delta = m_tuned.weight.to(device, torch.float32) - m_org.weight.to(device, torch.float32)
        is_3x3 = delta.dim() == 4 and tuple(delta.shape[2:]) != (1, 1)
        rank = settings.conv_dim if is_3x3 and settings.conv_dim is not None else settings.dim
        factors = lowrank.svd(lowrank.as_matrix(delta))
        module = lowrank.to_module(
            factors, min(rank, int(factors.S.numel())), tuple(delta.shape), clamp_quantile=settings.clamp_quantile
        )
        out[name] = LoRAModuleWeights(module.down.cpu(), module.up.cpu(), module.alpha)
    return out
