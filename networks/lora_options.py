"""``--network_args`` of ``networks.lora``: parsing, validation, block dims/alphas and block learning-rate
weights, with the key names, presets and block numbering of sd-scripts (SD1/2: 25 slots; SDXL: 23, see
``LoRABlockLayout``)."""

from __future__ import annotations

import difflib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from library.errors import UserError
from library.models.families.base import SD_LORA_BLOCKS, LoRABlockLayout

logger = logging.getLogger(__name__)

NUM_OF_BLOCKS = 12  # down (and up) block slots of the SD1/2 UNet in LDM numbering; mid is slot 12
NUM_BLOCK_VALUES = NUM_OF_BLOCKS * 2 + 1
LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")

NETWORK_ARGS = (
    "conv_dim",
    "conv_alpha",
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
    "block_lr_zero_threshold",
    "rank_dropout",
    "module_dropout",
    "dropout",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
)
SHAPE_ARGS = ("conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")

_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def block_index(lora_name: str, layout: LoRABlockLayout = SD_LORA_BLOCKS) -> int:
    """UNet block slot of a LoRA module, -1 outside the UNet's blocks. SD1/2: 1-11 down, 12 mid, 13-24 up (LDM
    numbering); SDXL: 0 embeddings, 1-9 input blocks, 10-12 middle block parts, 13-21 output blocks, 22 out."""
    if layout.sgm_names:
        return _sgm_block_index(lora_name, layout)
    m = _RE_UPDOWN.search(lora_name)
    if m:
        kind, i, part, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + (2 if part in ("upsamplers", "downsamplers") else j)
        return 1 + idx if kind == "down" else NUM_OF_BLOCKS + 1 + idx
    if "mid_block_" in lora_name:
        return NUM_OF_BLOCKS
    return -1


def _sgm_block_index(lora_name: str, layout: LoRABlockLayout) -> int:
    if not lora_name.startswith("lora_unet_"):
        return -1
    name = lora_name[len("lora_unet_"):]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    if name.startswith("out_"):
        return layout.total - 1
    starts = {"input_blocks_": 1, "middle_block_": 1 + layout.input_blocks,
              "output_blocks_": 1 + layout.input_blocks + layout.mid_blocks}
    for prefix, first in starts.items():
        if name.startswith(prefix):
            return first + int(name[len(prefix):].split("_")[0])
    return -1


# ----------------------------------------------------------------------------------------------------------------
# --network_args


_EXAMPLES = {
    "block_dims": ",".join(["4"] * NUM_BLOCK_VALUES),
    "block_alphas": ",".join(["1"] * NUM_BLOCK_VALUES),
    "conv_block_dims": ",".join(["4"] * NUM_BLOCK_VALUES),
    "conv_block_alphas": ",".join(["1"] * NUM_BLOCK_VALUES),
    "down_lr_weight": "cosine+0.1",
    "up_lr_weight": "1,1,1,1,1,1,0.5,0.5,0.5,0.5,0.5,0.5",
    "mid_lr_weight": "0.5",
    "conv_dim": "4",
    "conv_alpha": "1",
}


def _bad(key: str, value: Any, expected: str) -> UserError:
    example = _EXAMPLES.get(key, "16" if key.startswith("loraplus") else "0.1")
    return UserError(f"--network_args {key}={value!r}: expected {expected}, e.g. {key}={example}")


def _parse_int(key: str, value: Any, minimum: int = 0) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise _bad(key, value, "an integer") from None
    if number < minimum:
        raise _bad(key, value, f"an integer >= {minimum}")
    return number


def _parse_float(key: str, value: Any) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        raise _bad(key, value, "a number") from None
    if not math.isfinite(number):
        raise _bad(key, value, "a finite number")
    return number


def _parse_probability(key: str, value: Any) -> float | None:
    if value is None:
        return None
    p = _parse_float(key, value)
    if not 0.0 <= p < 1.0:
        raise _bad(key, value, "a probability in [0, 1)")
    return p or None


def _parse_list(key: str, value: Any, kind: type, layout: LoRABlockLayout | None) -> tuple:
    """A comma-separated list of one value per block slot (any length while the layout is not known yet)."""
    items = [s.strip() for s in str(value).split(",")]
    try:
        values = tuple(kind(s) for s in items)
    except ValueError:
        raise _bad(key, value, f"comma-separated {'integers' if kind is int else 'numbers'}") from None
    if layout is not None and len(values) != layout.total:
        raise UserError(f"--network_args {key}: {len(values)} values given, {layout.total} needed for the "
                        f"{layout.name} UNet ({layout.describe()})")
    return values


def _lr_weight_list(key: str, value: Any, threshold: float, n: int) -> tuple[float, ...]:
    """``down_lr_weight`` / ``up_lr_weight``: ``n`` weights, from numbers or a preset."""
    text = str(value).strip()
    name, _, base_text = text.partition("+")
    if "," not in text and name in LR_WEIGHT_PRESETS:
        base = _parse_float(key, base_text) if base_text else 0.0
        if name == "zeros":
            weights = [base] * n
        elif name in ("linear", "reverse_linear"):
            order = range(n) if name == "linear" else reversed(range(n))
            weights = [i / (n - 1) + base for i in order]
        else:
            order = range(n) if name == "sine" else reversed(range(n))
            weights = [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in order]
    else:
        try:
            weights = [float(s) if s.strip() else 0.0 for s in text.split(",")]
        except ValueError:
            close = difflib.get_close_matches(name, LR_WEIGHT_PRESETS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _bad(key, value, f"comma-separated numbers or a preset {'|'.join(LR_WEIGHT_PRESETS)}[+base]{hint}")
        weights = _fill_weights(key, weights, n)
    return tuple(w if w > threshold else 0.0 for w in weights)


def _fill_weights(key: str, weights: list[float], n: int) -> list[float]:
    if len(weights) > n:
        raise UserError(f"--network_args {key}: {len(weights)} values given, at most {n} allowed")
    if len(weights) < n:
        logger.warning("%s has %d values; the remaining blocks get weight 1.0", key, len(weights))
        weights += [1.0] * (n - len(weights))
    return weights


@dataclass(frozen=True)
class LoRAOptions:
    """Everything that decides the network's shape and training behaviour (parsed ``--network_args``)."""

    dim: int = 4
    alpha: float = 1.0
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    conv_dim: int | None = None
    conv_alpha: float | None = None
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None
    down_lr_weight: tuple[float, ...] | None = None
    mid_lr_weight: tuple[float, ...] | None = None
    up_lr_weight: tuple[float, ...] | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    modules_dim: Mapping[str, int] | None = field(default=None, repr=False)
    modules_alpha: Mapping[str, float] | None = field(default=None, repr=False)
    layout: LoRABlockLayout = SD_LORA_BLOCKS

    @property
    def block_lr(self) -> bool:
        return any(w is not None for w in (self.down_lr_weight, self.mid_lr_weight, self.up_lr_weight))

    @property
    def scans_conv_blocks(self) -> bool:
        return self.conv_dim is not None or self.conv_block_dims is not None or self.modules_dim is not None

    def lr_weight(self, block_idx: int) -> float:
        """Learning-rate weight of a UNet block slot (``block_index``); 1.0 where none is set."""
        weights = block_lr_weights(self.layout, self.down_lr_weight, self.mid_lr_weight, self.up_lr_weight)
        return weights[block_idx] if 0 <= block_idx < len(weights) else 1.0

    def rank_for(self, lora_name: str, is_unet: bool, is_3x3: bool) -> tuple[int, float] | None:
        """``(rank, alpha)`` of a module, or None when it gets no LoRA."""
        if self.modules_dim is not None:
            if lora_name not in self.modules_dim:
                return None
            dim = self.modules_dim[lora_name]
            return dim, (self.modules_alpha or {}).get(lora_name, dim)
        idx = block_index(lora_name, self.layout) if is_unet else -1
        if is_unet and self.block_dims is not None and idx >= 0:
            if not is_3x3:
                dim, alpha = self.block_dims[idx], self.block_alphas[idx]
            elif self.conv_block_dims is not None:
                dim, alpha = self.conv_block_dims[idx], self.conv_block_alphas[idx]
            else:
                return None
        elif not is_3x3:
            dim, alpha = self.dim, self.alpha
        elif self.conv_dim is not None:
            dim, alpha = self.conv_dim, self.conv_alpha
        else:
            return None
        return (dim, alpha) if dim else None


def block_lr_weights(layout: LoRABlockLayout, down: tuple[float, ...] | None, mid: tuple[float, ...] | None,
                     up: tuple[float, ...] | None) -> list[float]:
    """The learning-rate weight of every block slot of ``layout`` (1.0 where none is given)."""
    end = [1.0] if layout.ends else []
    return (end + list(down or [1.0] * layout.input_blocks) + list(mid or [1.0] * layout.mid_blocks)
            + list(up or [1.0] * layout.input_blocks) + end)


def parse_network_kwargs(
    kwargs: Mapping[str, Any],
    network_dim: int | None = None,
    network_alpha: float | None = None,
    neuron_dropout: float | None = None,
    layout: LoRABlockLayout | None = SD_LORA_BLOCKS,
) -> LoRAOptions:
    """Validate ``--network_args`` for this module and resolve block dims/alphas and block LR weights in the
    block numbering of ``layout`` (the denoiser's family). ``layout=None``: the family is not known yet, so
    the per-block lists are checked for their values only (and not resolved).

    Raises :class:`UserError` for unknown keys (with a "did you mean") and malformed values.
    """
    unknown = [k for k in kwargs if k not in NETWORK_ARGS]
    if unknown:
        problems = []
        for key in unknown:
            close = difflib.get_close_matches(key, NETWORK_ARGS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(NETWORK_ARGS)}"
            problems.append(f"{key!r} is not an argument of networks.lora ({hint})")
        raise UserError.from_problems("--network_args", problems)

    def get(key: str) -> Any:
        value = kwargs.get(key)
        return None if value is None or str(value).strip() in ("", "None") else value

    dim = 4 if network_dim is None else int(network_dim)
    alpha = 1.0 if network_alpha is None else float(network_alpha)
    dropout = neuron_dropout if neuron_dropout is not None else get("dropout")
    conv_dim = None if get("conv_dim") is None else _parse_int("conv_dim", get("conv_dim"))
    conv_alpha = None if get("conv_alpha") is None else _parse_float("conv_alpha", get("conv_alpha"))
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = 1.0
    threshold = _parse_float("block_lr_zero_threshold", get("block_lr_zero_threshold") or 0.0)
    shape = layout or SD_LORA_BLOCKS  # lengths of the down/up/mid weight lists (checked again with the family)
    down = up = mid = None
    if get("down_lr_weight") is not None:
        down = _lr_weight_list("down_lr_weight", get("down_lr_weight"), threshold, shape.input_blocks)
    if get("up_lr_weight") is not None:
        up = _lr_weight_list("up_lr_weight", get("up_lr_weight"), threshold, shape.input_blocks)
    if get("mid_lr_weight") is not None:
        values = [_parse_float("mid_lr_weight", v) if v.strip() else 0.0 for v in str(get("mid_lr_weight")).split(",")]
        mid = tuple(w if w > threshold else 0.0 for w in _fill_weights("mid_lr_weight", values, shape.mid_blocks))

    block_dims = block_alphas = conv_block_dims = conv_block_alphas = None
    for key, kind in (("block_dims", int), ("block_alphas", float), ("conv_block_dims", int),
                      ("conv_block_alphas", float)):
        if get(key) is not None:
            _parse_list(key, get(key), kind, layout)
    if layout is not None and (any(get(k) is not None for k in ("block_dims", "conv_block_dims")) or down or up
                               or mid is not None):
        block_dims, block_alphas, conv_block_dims, conv_block_alphas = _block_shapes(
            get, layout, dim, alpha, conv_dim, conv_alpha, block_lr_weights(layout, down, mid, up))

    def ratio(key: str) -> float | None:
        return None if get(key) is None else _parse_float(key, get(key))

    return LoRAOptions(
        dim=dim,
        alpha=alpha,
        dropout=_parse_probability("dropout", dropout),
        rank_dropout=_parse_probability("rank_dropout", get("rank_dropout")),
        module_dropout=_parse_probability("module_dropout", get("module_dropout")),
        conv_dim=conv_dim,
        conv_alpha=conv_alpha,
        block_dims=block_dims,
        block_alphas=block_alphas,
        conv_block_dims=conv_block_dims,
        conv_block_alphas=conv_block_alphas,
        down_lr_weight=down,
        mid_lr_weight=mid,
        up_lr_weight=up,
        layout=layout or SD_LORA_BLOCKS,
        loraplus_lr_ratio=ratio("loraplus_lr_ratio"),
        loraplus_unet_lr_ratio=ratio("loraplus_unet_lr_ratio"),
        loraplus_text_encoder_lr_ratio=ratio("loraplus_text_encoder_lr_ratio"),
    )


def _block_shapes(get: Any, layout: LoRABlockLayout, dim: int, alpha: float, conv_dim: int | None,
                  conv_alpha: float | None, lr_weights: list[float]) -> tuple:
    """``(block_dims, block_alphas, conv_block_dims, conv_block_alphas)``, one value per block slot; blocks
    whose learning rate is zero get no LoRA at all."""
    n = layout.total
    block_dims = _parse_list("block_dims", get("block_dims"), int, layout) if get("block_dims") else (dim,) * n
    block_alphas = (_parse_list("block_alphas", get("block_alphas"), float, layout) if get("block_alphas")
                    else (alpha,) * n)
    conv_block_dims = conv_block_alphas = None
    if get("conv_block_dims") is not None:
        conv_block_dims = _parse_list("conv_block_dims", get("conv_block_dims"), int, layout)
        conv_block_alphas = (
            _parse_list("conv_block_alphas", get("conv_block_alphas"), float, layout)
            if get("conv_block_alphas")
            else (conv_alpha if conv_alpha is not None else 1.0,) * n
        )
    elif conv_dim is not None:
        conv_block_dims, conv_block_alphas = (conv_dim,) * n, (conv_alpha,) * n
    zero = {i for i, w in enumerate(lr_weights) if w == 0}
    block_dims = tuple(0 if i in zero else d for i, d in enumerate(block_dims))
    if conv_block_dims is not None:
        conv_block_dims = tuple(0 if i in zero else d for i, d in enumerate(conv_block_dims))
    return block_dims, block_alphas, conv_block_dims, conv_block_alphas
