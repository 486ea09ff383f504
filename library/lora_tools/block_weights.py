"""``--lbws``: layer/block-wise weights of each LoRA in a merge, as sd-scripts' ``sdxl_merge_lora.py`` and
``svd_merge_lora.py`` take them (the "LoRA Block Weight" convention).

One JSON list per LoRA, e.g. ``"[1,0,0,0,0,0,1,1,1,1,1,1]"``. Its length picks the layout: 17 or 26 values for
SD1.x/2.x, 12 or 20 for SDXL. The values go to the blocks of :data:`BLOCKS` that the layout selects (BASE = the
text encoders, INxx / MID / OUTxx = the UNet's input, middle and output blocks); every other block keeps weight 1.
A module's delta is multiplied by its block's weight (on top of ``--ratios``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Sequence

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
FAMILY_LAYOUTS = {"sd1": (17, 26), "sd2": (17, 26), "sdxl": (12, 20)}
_SD_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def block_index(lora_name: str, sdxl: bool) -> int:
    """The index in :data:`BLOCKS` of a kohya module name (0 for the text encoders), -1 if it is in no block."""
    if lora_name.startswith("lora_te"):
        return 0
    name = lora_name[len("lora_unet_"):]
    if sdxl:
        number = lambda: int(name.split("_")[2])  # noqa: E731
        if name.startswith(("time_embed_", "label_emb_")):
            return 1
        if name.startswith("input_blocks_"):
            return 1 + number()
        if name.startswith("middle_block_"):
            return 13
        if name.startswith("output_blocks_"):
            return 14 + number()
        return 23 if name.startswith("out_") else -1
    match = _SD_UPDOWN.search(lora_name)
    if match:
        side, i, kind, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        if side == "down":
            return 1 + (3 * (i + 1) if kind == "downsamplers" else 3 * i + j + 1)
        return 14 + (3 * i + 2 if kind == "upsamplers" else 3 * i + j)
    return 13 if "mid_block_" in lora_name else -1


@dataclass(frozen=True)
class MergeWeights:
    """``--ratios`` and, per LoRA, its block weights (26 values, by :data:`BLOCKS`; None: none given)."""

    ratios: tuple[float, ...]
    blocks: tuple[tuple[float, ...] | None, ...] = ()
    sdxl: bool = False

    def of(self, index: int, lora_name: str) -> float:
        """The factor of file ``index``'s module ``lora_name``."""
        ratio = self.ratios[index]
        weights = self.blocks[index] if index < len(self.blocks) else None
        if weights is None:
            return ratio
        block = block_index(lora_name, self.sdxl)
        return ratio * (weights[block] if block >= 0 else 1.0)


def parse_lbws(lbws: Sequence[str] | None, ratios: Sequence[float], family: str | None,
               label: str) -> MergeWeights:
    """``--lbws`` checked against the LoRAs' family (``label`` names it in messages)."""
    if not lbws:
        return MergeWeights(tuple(ratios))
    if family not in FAMILY_LAYOUTS:
        raise UserError(f"--lbws: block weights are defined for SD1.x/2.x and SDXL LoRAs; these are {label}")
    if len(lbws) > len(ratios):
        raise UserError(f"--lbws has {len(lbws)} lists for {len(ratios)} --models; give at most one per LoRA")
    lists = [_parse_one(text) for text in lbws]
    lengths = {len(values) for values in lists}
    allowed = FAMILY_LAYOUTS[family]
    if len(lengths) > 1 or lengths.pop() not in allowed:
        raise UserError(f"--lbws: every list must have {' or '.join(map(str, allowed))} values for {label} LoRAs "
                        f"(got {', '.join(str(len(v)) for v in lists)}); see docs/lora_tools.md for the blocks")
    blocks = []
    for values in lists:
        full = dict.fromkeys(BLOCKS, 1.0)
        full.update(zip(LAYOUTS[len(values)], values))
        blocks.append(tuple(full[b] for b in BLOCKS))
    return MergeWeights(tuple(ratios), tuple(blocks), sdxl=family == "sdxl")


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
            changed = ", ".join(f"{b} {w:g}" for b, w in zip(BLOCKS, blocks) if w != 1.0) or "all 1"
            lines.append(f"block weights of LoRA {i + 1}: {changed}")
    return lines
