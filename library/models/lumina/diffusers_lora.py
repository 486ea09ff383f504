"""sd-scripts' Lumina LoRA files -> the diffusers LoRA format that ``Lumina2Pipeline.load_lora_weights`` applies.

diffusers 0.42 reads sd-scripts' ``lora_unet_*`` names for Lumina as nothing, and its converter for ComfyUI-style
``diffusion_model.*`` files hard-codes the 2B model's q/k/v split. This writes diffusers' own PEFT names
(``transformer.<path>.lora_A.weight`` / ``lora_B.weight``): a fused ``attention_qkv`` module becomes one LoRA per
split layer with the shared down-projection as every ``lora_A`` and the up-projection's row blocks as the
``lora_B``s, and ``alpha / rank`` is folded into ``lora_B`` (diffusers then applies ``B @ A`` at scale 1), so
``W += alpha / r * up @ down`` exactly as our merge. diffusers loads LoRAs into the transformer only: Gemma2
modules (``lora_te_*``) are left out and counted.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from networks.lora_lumina import BLOCK_TARGETS, EMBEDDER_TARGETS, FINAL_TARGETS, PREFIX_UNET

_BLOCK = re.compile(r"^lora_unet_(layers|noise_refiner|context_refiner)_(\d+)_(.+)$")
_SINGLE = {f"{PREFIX_UNET}_{name}": path for name, path in FINAL_TARGETS}
_SINGLE.update({f"{PREFIX_UNET}_{name}": path for group in EMBEDDER_TARGETS for name, path in group})


def diffusers_paths(lora_name: str) -> tuple[str, ...] | None:
    """The diffusers layers (in fused row order) of a kohya Lumina transformer module; None for others."""
    if lora_name in _SINGLE:
        return (_SINGLE[lora_name],)
    match = _BLOCK.match(lora_name)
    if match is None:
        return None
    kind, index, suffix = match.groups()
    parts = dict(BLOCK_TARGETS).get(suffix)
    return None if parts is None else tuple(f"{kind}.{index}.{p}" for p in parts)


def _split_rows(paths: tuple[str, ...], down: torch.Tensor, up: torch.Tensor) -> list[int]:
    """Rows of each part: q has the model width (the qkv input), k and v share the rest."""
    if len(paths) == 1:
        return [up.shape[0]]
    kv = (up.shape[0] - down.shape[1]) // 2
    return [down.shape[1], kv, kv]


def to_diffusers_lora(weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(diffusers state dict, kohya names left out)`` for kohya Lumina LoRA ``weights``."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        name, _, rest = key.partition(".")
        modules.setdefault(name, {})[rest] = value
    out: dict[str, torch.Tensor] = {}
    skipped = []
    for name, sd in sorted(modules.items()):
        paths = diffusers_paths(name)
        if paths is None or "lora_down.weight" not in sd:
            skipped.append(name)
            continue
        down, up = sd["lora_down.weight"].float(), sd["lora_up.weight"].float()
        scale = float(sd["alpha"]) / down.shape[0] if "alpha" in sd else 1.0
        start = 0
        for path, rows in zip(paths, _split_rows(paths, down, up)):
            out[f"transformer.{path}.lora_A.weight"] = down.clone().contiguous()
            out[f"transformer.{path}.lora_B.weight"] = (up[start:start + rows] * scale).contiguous()
            start += rows
    return out, skipped
