"""Merging LoRAs: into a model's weights, into one LoRA by exact rank concatenation, or by SVD to a new rank.

Every merge works on whole deltas ``ratio * up @ down * alpha / r``, so its result is exact (concatenation and
checkpoint merge) or the best approximation of that rank (SVD). sd-scripts' default LoRA-into-LoRA merge adds
``up`` and ``down`` weights separately, which is not the sum of the deltas; here it is.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

from library.errors import UserError
from library.lora_tools import lowrank
from library.lora_tools.block_weights import MergeWeights
from library.lora_tools.lora_file import LoRAFile, LoRAModuleWeights
from library.lora_tools.targets import ModelForLoRA, fused_shape, fused_weight, store_weight


def _listing(items: Sequence[str], limit: int = 6) -> str:
    items = sorted(items)
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_same_shapes(files: Sequence[LoRAFile]) -> None:
    """Modules of the same name must change weights of the same shape (same kernel too) in every file."""
    seen: dict[str, tuple[tuple[int, ...], str]] = {}
    problems = []
    for f in files:
        for name, m in f.modules.items():
            shape = (*m.weight_shape, *m.down.shape[2:])
            if name in seen and seen[name][0] != shape:
                problems.append(f"{name}: {seen[name][0]} in {seen[name][1]}, {shape} in {f.path}")
            seen.setdefault(name, (shape, str(f.path)))
    if problems:
        raise UserError.from_problems(
            "the LoRA files do not fit each other (made for different models, e.g. SD1 and SD2?)", problems[:6]
        )


Ratios = MergeWeights | Sequence[float]


def _weights(ratios: Ratios) -> MergeWeights:
    """``--ratios`` (and ``--lbws``) as one :class:`MergeWeights`."""
    return ratios if isinstance(ratios, MergeWeights) else MergeWeights(tuple(ratios))


def _scaled_pieces(files: Sequence[LoRAFile], ratios: Ratios, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(up, down)`` of every file for one module with ``ratio * alpha / r`` folded in (split as sqrt between
    up and down, the sign on down) so that ``up @ down`` is the module's delta."""
    pieces = []
    weights = _weights(ratios)
    for i, f in enumerate(files):
        m = f.modules.get(name)
        scale = 0.0 if m is None else weights.of(i, name) * m.scale
        if scale == 0:
            continue
        root = abs(scale) ** 0.5
        pieces.append((m.up.float() * root, m.down.float() * (root if scale > 0 else -root)))
    return pieces


def _module_names(files: Sequence[LoRAFile]) -> list[str]:
    return sorted({name for f in files for name in f.modules})


def concat_loras(
    files: Sequence[LoRAFile], ratios: Ratios, *, shuffle: bool = False, seed: int | None = None
) -> dict[str, LoRAModuleWeights]:
    """One LoRA whose every module is the exact sum of the files' deltas times their ratios: the ranks are
    concatenated (rank = sum of ranks, alpha = rank). ``shuffle`` permutes the ranks of each module (the delta
    does not change)."""
    check_same_shapes(files)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out: dict[str, LoRAModuleWeights] = {}
    for name in tqdm(_module_names(files), desc="concatenating", unit="module", leave=False):
        pieces = _scaled_pieces(files, ratios, name)
        if not pieces:
            continue
        up = torch.cat([p[0] for p in pieces], dim=1)
        down = torch.cat([p[1] for p in pieces], dim=0)
        if shuffle:
            perm = torch.randperm(down.shape[0], generator=generator)
            up, down = up[:, perm], down[perm]
        out[name] = LoRAModuleWeights(down.contiguous(), up.contiguous(), float(down.shape[0]))
    return out


def svd_merge(
    files: Sequence[LoRAFile],
    ratios: Ratios,
    new_rank: int,
    new_conv_rank: int,
    *,
    device: str | torch.device = "cpu",
) -> dict[str, LoRAModuleWeights]:
    """One LoRA of rank ``new_rank`` (``new_conv_rank`` for 3x3 convs) per module: the best approximation (SVD)
    of the sum of the files' deltas times their ratios. Alpha = rank (scale 1)."""
    check_same_shapes(files)
    out: dict[str, LoRAModuleWeights] = {}
    for name in tqdm(_module_names(files), desc="SVD merge", unit="module"):
        pieces = _scaled_pieces(files, ratios, name)
        if not pieces:
            continue
        shape = next(f.modules[name] for f in files if name in f.modules).weight_shape
        up = torch.cat([lowrank.as_matrix(p[0]) for p in pieces], dim=1).to(device)
        down = torch.cat([lowrank.as_matrix(p[1]) for p in pieces], dim=0).to(device)
        factors = lowrank.svd_of_product(up, down)
        rank = new_conv_rank if len(shape) == 4 and shape[2:] != (1, 1) else new_rank
        module = lowrank.to_module(factors, lowrank.select_rank(factors.S, lowrank.RankChoice(rank)), shape)
        out[name] = LoRAModuleWeights(module.down.cpu(), module.up.cpu(), module.alpha)
    return out


def unmatched_modules(model: ModelForLoRA, files: Sequence[LoRAFile]) -> list[str]:
    """Problems that keep the files from merging into ``model``: names it lacks, shapes that differ."""
    targets = model.targets()
    problems = []
    for f in files:
        missing = [n for n in f.modules if n not in targets]
        te = [n for n in missing if n.startswith("lora_te")]
        held = {n.split("_")[1] for n in targets if n.startswith("lora_te")}
        if te and not any(n.split("_")[1] in held for n in te):
            problems.append(f"{f.path}: {len(te)} text encoder modules ({_listing(te, 2)}), but {model.source} "
                            "holds no text encoder (the model file is the transformer alone); give the text encoder "
                            "files with their outputs (FLUX.1: --clip_l/--clip_l_save_to, --t5xxl/--t5xxl_save_to), "
                            "or merge a LoRA without text encoder modules (trained with --network_train_unet_only)")
            missing = [n for n in missing if not n.startswith("lora_te")]
        if missing:
            problems.append(f"{f.path}: {len(missing)} modules match nothing in the model: {_listing(missing)}")
        wrong = [
            f"{n} {tuple(m.weight_shape)} vs model {fused_shape(targets[n])}"
            for n, m in f.modules.items()
            if n in targets and fused_shape(targets[n]) != tuple(m.weight_shape)
        ]
        if wrong:
            problems.append(f"{f.path}: {len(wrong)} modules have other shapes than the model: {_listing(wrong, 3)}")
    return problems


@torch.no_grad()
def merge_into_model(
    model: ModelForLoRA,
    files: Sequence[LoRAFile],
    ratios: Ratios,
    *,
    device: str | torch.device = "cpu",
) -> int:
    """Add ``ratio (x block weight) * up @ down * alpha / r`` of every module of every file to the model's weights (computed in
    float32 on ``device``, stored in the weight's dtype). Everything is checked before any weight changes.
    Returns the number of weights changed."""
    problems = unmatched_modules(model, files)
    if problems:
        raise UserError.from_problems(f"cannot merge into {model.source}", problems)
    targets = model.targets()
    deltas: dict[str, list[tuple[float, LoRAModuleWeights]]] = {}
    weights = _weights(ratios)
    for i, f in enumerate(files):
        for name, m in f.modules.items():
            deltas.setdefault(name, []).append((weights.of(i, name), m))
    for name, items in tqdm(sorted(deltas.items()), desc="merging", unit="module"):
        merged = fused_weight(targets[name], device)
        for ratio, m in items:
            merged += ratio * m.delta(device)
        store_weight(targets[name], merged)
    return len(deltas)
