"""``--lbws``: layer/block-wise weights of each LoRA in a merge, as sd-scripts' ``sdxl_merge_lora.py`` and
``svd_merge_lora.py`` take them (the "LoRA Block Weight" convention).

One JSON list per LoRA, e.g. ``"[1,0,0,0,0,0,1,1,1,1,1,1]"``. A family's :class:`BlockLayout` (its
``LORA_FAMILIES`` row) names its blocks and says which blocks a list of each accepted length sets: SD1.x/2.x
17 or 26 values, SDXL 12 or 20 (BASE = the text encoders, INxx / MID / OUTxx = the UNet's input, middle and
output blocks); FLUX.1 61 (CLIP, T5, IN, D00-D18, S00-S37, OUT, the order of the LoRA Block Weight tools), and SD3 /
Lumina the same pattern over their blocks. Every block a list does not set keeps weight 1. A module's delta is
multiplied by its block's weight (on top of ``--ratios``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Sequence

from library.errors import UserError

BLOCKS = ("BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12)))
_RANGE = lambda prefix, a, b: tuple(f"{prefix}{i:02d}" for i in range(a, b + 1))  # noqa: E731
#: the blocks each length of list sets (sd-scripts' LAYER12 / LAYER17 / LAYER20 / LAYER26)
LAYOUTS: dict[int, tuple[str, ...]] = {
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *_RANGE("OUT", 0, 5)),
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *_RANGE("OUT", 3, 11)),
    20: ("BASE", *_RANGE("IN", 0, 8), "MID", *_RANGE("OUT", 0, 8)),
    26: BLOCKS,
}
_SD_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def sd_block(lora_name: str) -> str | None:
    """The :data:`BLOCKS` name of an SD1.x/2.x (diffusers-named) kohya module, None if it is in no block."""
    if lora_name.startswith("lora_te"):
        return "BASE"
    match = _SD_UPDOWN.search(lora_name)
    if match:
        side, i, kind, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        if side == "down":
            return BLOCKS[1 + (3 * (i + 1) if kind == "downsamplers" else 3 * i + j + 1)]
        return BLOCKS[14 + (3 * i + 2 if kind == "upsamplers" else 3 * i + j)]
    return "MID" if "mid_block_" in lora_name else None


def sdxl_block(lora_name: str) -> str | None:
    """The :data:`BLOCKS` name of an SDXL (SGM-named) kohya module (embeddings in IN00, ``out`` in OUT09)."""
    if lora_name.startswith("lora_te"):
        return "BASE"
    name = lora_name[len("lora_unet_"):]
    number = lambda: int(name.split("_")[2])  # noqa: E731
    if name.startswith(("time_embed_", "label_emb_")):
        return "IN00"
    if name.startswith("input_blocks_"):
        return BLOCKS[1 + number()]
    if name.startswith("middle_block_"):
        return "MID"
    if name.startswith("output_blocks_"):
        return BLOCKS[14 + number()]
    return "OUT09" if name.startswith("out_") else None


@dataclass(frozen=True)
class BlockLayout:
    """A family's blocks (``blocks``, in order), the blocks a list of each accepted length sets (``lists``), and
    the block of a kohya module name (``block_of``; None: no block, weight 1)."""

    blocks: tuple[str, ...]
    lists: Mapping[int, tuple[str, ...]]
    block_of: Callable[[str], str | None]


SD_LAYOUT = BlockLayout(BLOCKS, {17: LAYOUTS[17], 26: BLOCKS}, sd_block)
SDXL_LAYOUT = BlockLayout(BLOCKS, {12: LAYOUTS[12], 20: LAYOUTS[20]}, sdxl_block)


@dataclass(frozen=True)
class TransformerBlocks:
    """The block layout of a transformer family: named parts first (``lead``: text encoders, embedders), then
    each numbered kind of block (``groups``: label, pattern with the block number, the full-size model's count),
    then ``tail`` (the final layer). A list has one value per block; how many blocks of each kind there are comes
    from the full-size model, or, for other sizes, from the LoRA files (the highest block number they hold)."""

    lead: tuple[tuple[str, str], ...]
    groups: tuple[tuple[str, str, tuple[int, ...]], ...]
    tail: tuple[tuple[str, str], ...] = ()

    def _layout(self, counts: Sequence[int]) -> BlockLayout:
        named = [(label, pattern) for label, pattern in self.lead]
        for (label, pattern, _), count in zip(self.groups, counts):
            named += [(f"{label}{i:02d}", pattern.replace(r"(\d+)", str(i))) for i in range(count)]
        named += list(self.tail)
        blocks = tuple(label for label, _ in named)

        def block_of(name: str) -> str | None:
            return next((label for label, pattern in named if re.match(pattern, name)), None)
        return BlockLayout(blocks, {len(blocks): blocks}, block_of)

    def layouts(self, names: Collection[str]) -> list[BlockLayout]:
        """The layouts a list may follow for LoRA files holding the modules ``names``: the full-size model's
        (when the files fit it) and the files' own block counts."""
        found = []
        for _, pattern, _ in self.groups:
            numbers = [int(m.group(1)) for n in names if (m := re.match(pattern, n))]
            found.append(max(numbers, default=-1) + 1)
        candidates = [tuple(full) for full in zip(*(g[2] for g in self.groups))
                      if all(f >= n for f, n in zip(full, found))]
        candidates += [tuple(found)] if tuple(found) not in candidates else []
        return [self._layout(counts) for counts in candidates]


#: FLUX.1: the LoRA Block Weight tools' 61 blocks (CLIP-L, T5, the embedders, 19 double and 38 single blocks, the
#: final layer)
FLUX_BLOCKS = TransformerBlocks(
    lead=(("CLIP", r"lora_te1_"), ("T5", r"lora_te3_"), ("IN", r"lora_unet_(img_in|time_in|vector_in|guidance_in|txt_in)")),
    groups=(("D", r"lora_unet_double_blocks_(\d+)_", (19,)), ("S", r"lora_unet_single_blocks_(\d+)_", (38,))),
    tail=(("OUT", r"lora_unet_final_layer_"),),
)
#: SD3 / SD3.5: CLIP-L, CLIP-G, T5, the embedders, the joint blocks (24 Medium, 38 Large), the final layer
SD3_BLOCKS = TransformerBlocks(
    lead=(("CLIP_L", r"lora_te1_"), ("CLIP_G", r"lora_te2_"), ("T5", r"lora_te3_"),
          ("IN", r"lora_unet_(x_embedder|t_embedder|y_embedder|context_embedder)")),
    groups=(("J", r"lora_unet_joint_blocks_(\d+)_", (24, 38)),),
    tail=(("OUT", r"lora_unet_final_layer_"),),
)
#: Lumina 2: Gemma2, the embedders, the noise and context refiners (2 each), the 26 layers, the final layer
LUMINA_BLOCKS = TransformerBlocks(
    lead=(("TE", r"lora_te_"), ("IN", r"lora_unet_(x_embedder|t_embedder|cap_embedder)")),
    groups=(("N", r"lora_unet_noise_refiner_(\d+)_", (2,)), ("C", r"lora_unet_context_refiner_(\d+)_", (2,)),
            ("L", r"lora_unet_layers_(\d+)_", (26,))),
    tail=(("OUT", r"lora_unet_final_layer_"),),
)


def fixed(layout: BlockLayout) -> Callable[[Collection[str]], list[BlockLayout]]:
    return lambda names: [layout]


@dataclass(frozen=True)
class MergeWeights:
    """``--ratios`` and, per LoRA, its block weights (by block name; None: none given) in ``layout``."""

    ratios: tuple[float, ...]
    blocks: tuple[Mapping[str, float] | None, ...] = ()
    layout: BlockLayout | None = None

    def of(self, index: int, lora_name: str) -> float:
        """The factor of file ``index``'s module ``lora_name``."""
        ratio = self.ratios[index]
        weights = self.blocks[index] if index < len(self.blocks) else None
        if weights is None or self.layout is None:
            return ratio
        block = self.layout.block_of(lora_name)
        return ratio * (weights.get(block, 1.0) if block is not None else 1.0)


def parse_lbws(lbws: Sequence[str] | None, ratios: Sequence[float],
               layouts: Callable[[Collection[str]], list[BlockLayout]] | None, names: Collection[str],
               label: str) -> MergeWeights:
    """``--lbws`` checked against the LoRAs' family: ``layouts`` (its row's block layouts, None: the family has
    none) for the files' module ``names``; ``label`` names the family in messages."""
    if not lbws:
        return MergeWeights(tuple(ratios))
    if layouts is None:
        raise UserError(f"--lbws: block weights are not defined for {label} LoRAs")
    if len(lbws) > len(ratios):
        raise UserError(f"--lbws has {len(lbws)} lists for {len(ratios)} --models; give at most one per LoRA")
    lists = [_parse_one(text) for text in lbws]
    lengths = {len(values) for values in lists}
    choices = {n: (layout, sets) for layout in layouts(names) for n, sets in layout.lists.items()}
    if len(lengths) > 1 or next(iter(lengths)) not in choices:
        allowed = " or ".join(str(n) for n in sorted(choices))
        raise UserError(f"--lbws: every list must have {allowed} values for {label} LoRAs "
                        f"(got {', '.join(str(len(v)) for v in lists)}); see docs/lora_tools.md for the blocks")
    layout, sets = choices[len(lists[0])]
    blocks = []
    for values in lists:
        full = dict.fromkeys(layout.blocks, 1.0)
        full.update(zip(sets, values))
        blocks.append(full)
    return MergeWeights(tuple(ratios), tuple(blocks), layout)


def _parse_one(text: str) -> list[float]:
    try:
        values = json.loads(text)
    except ValueError:
        values = None
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in values):
        raise UserError(f"--lbws {text!r}: give a JSON list of numbers, e.g. \"[1,0,0,0,0,0,1,1,1,1,1,1]\"")
    return [float(v) for v in values]


def describe(weights: MergeWeights) -> list[str]:
    """One line per LoRA with block weights: the blocks whose weight is not 1."""
    lines = []
    for i, blocks in enumerate(weights.blocks):
        if blocks is not None:
            changed = ", ".join(f"{b} {w:g}" for b, w in blocks.items() if w != 1.0) or "all 1"
            lines.append(f"block weights of LoRA {i + 1}: {changed}")
    return lines
