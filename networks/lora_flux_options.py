"""``--network_args`` of ``networks.lora_flux`` (sd-scripts' names): per-type ranks, ranks and learning rates by
regular expression (``network_reg_dims``/``network_reg_lrs``), embedder ranks, block selection, ``split_qkv``,
T5 training, LoRA+ and dropouts."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from library.errors import UserError

# sd-scripts' type_dims order and the name fragments that pick a module's type (all must occur in the name)
TYPE_DIM_ARGS = ("img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim",
                 "single_dim", "single_mod_dim")
_TYPE_FRAGMENTS = (("img_attn",), ("txt_attn",), ("img_mlp",), ("txt_mlp",), ("img_mod",), ("txt_mod",),
                   ("single_blocks", "linear"), ("modulation",))
IN_DIM_NAMES = ("img", "time", "vector", "guidance", "txt")
NETWORK_ARGS = TYPE_DIM_ARGS + (
    "in_dims", "train_blocks", "train_double_block_indices", "train_single_block_indices", "train_t5xxl",
    "split_qkv", "verbose", "dropout", "rank_dropout", "module_dropout", "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "network_reg_dims", "network_reg_lrs",
)
SHAPE_ARGS = TYPE_DIM_ARGS + ("in_dims", "train_blocks", "train_double_block_indices", "train_single_block_indices",
                              "network_reg_dims", "split_qkv")
TRAIN_BLOCKS = ("all", "single", "double")


@dataclass(frozen=True)
class FluxLoRAOptions:
    """Parsed ``--network_args`` (plus ``--network_dim``/``--network_alpha``/``--network_dropout``)."""

    dim: int = 4
    alpha: float = 1.0
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    type_dims: tuple[int | None, ...] = (None,) * 8
    in_dims: tuple[int, ...] | None = None
    train_blocks: str = "all"
    double_blocks: str | None = None  # train_double_block_indices as given ("all", "0,2-4", ...)
    single_blocks: str | None = None
    train_t5xxl: bool = False
    verbose: bool = False
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    split_qkv: bool = False
    reg_dims: tuple[tuple[str, int], ...] = ()  # (regex, rank): the first match wins, before the per-type ranks
    reg_lrs: tuple[tuple[str, float], ...] = ()  # (regex, learning rate): the first match wins
    modules_dim: Mapping[str, int] | None = field(default=None, repr=False)
    modules_alpha: Mapping[str, float] | None = field(default=None, repr=False)

    def rank_for(self, lora_name: str, selected: bool = True) -> tuple[int, float] | None:
        """``(rank, alpha)`` of a block module (``selected``: its block is trained), or None (no LoRA)."""
        if self.modules_dim is not None:
            if lora_name not in self.modules_dim:
                return None
            dim = self.modules_dim[lora_name]
            return dim, (self.modules_alpha or {}).get(lora_name, dim)
        dim = self.dim
        for pattern, reg_dim in self.reg_dims:
            if re.search(pattern, lora_name):
                return (reg_dim, self.alpha) if reg_dim and selected else None
        for type_dim, fragments in zip(self.type_dims, _TYPE_FRAGMENTS):
            if type_dim is not None and all(f in lora_name for f in fragments):
                dim = type_dim
                break
        return (dim, self.alpha) if dim and selected else None


def parse_block_selection(value: str | None, total: int, key: str) -> list[bool]:
    """``all``, ``none``, or comma-separated indices and ranges (``0,2-4``) -> one flag per block."""
    if value is None or value == "all":
        return [True] * total
    if value in ("none", ""):
        return [False] * total
    selected = [False] * total
    for part in value.split(","):
        try:
            bounds = [int(p) for p in part.strip().split("-")]
        except ValueError:
            raise UserError(f"--network_args {key}={value!r}: {part!r} is not an index or a range like 2-5") from None
        start, end = bounds[0], bounds[-1]
        if len(bounds) > 2 or not 0 <= start <= end < total:
            raise UserError(f"--network_args {key}={value!r}: {part!r} is outside 0..{total - 1} (this model has "
                            f"{total} such blocks)")
        for i in range(start, end + 1):
            selected[i] = True
    return selected


def _number(key: str, value: Any, kind: type) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"--network_args {key}={value!r}: expected a {kind.__name__}") from None


def _probability(key: str, value: Any) -> float | None:
    if value is None:
        return None
    p = _number(key, value, float)
    if not 0 <= p < 1:
        raise UserError(f"--network_args {key}={value!r}: expected a probability in [0, 1)")
    return p


def network_args_getter(kwargs: Mapping[str, Any], known: Sequence[str], module: str) -> Callable[[str], Any]:
    """Refuse unknown ``--network_args`` of ``module`` (all at once, each with a "did you mean"); return a getter
    that reads an empty value or ``None`` as not given."""
    problems = []
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
            problems.append(f"{key!r} is not an argument of {module} ({hint})")
    if problems:
        raise UserError.from_problems("--network_args", problems)

    def get(key: str) -> Any:
        value = kwargs.get(key)
        return None if value is None or str(value).strip() in ("", "None") else value

    return get


def _flag(key: str, value: Any) -> bool:
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise UserError(f"--network_args {key}={value!r}: expected True or False")
    return text in ("true", "1")


def _regex_pairs(key: str, value: Any, kind: type) -> tuple[tuple[str, Any], ...]:
    """sd-scripts' ``"regex=value,regex=value"`` (a regex cannot contain a comma)."""
    pairs = []
    for part in str(value).split(","):
        part = part.strip()
        if not part:
            continue
        pattern, sep, number = part.rpartition("=")
        if not sep or not pattern.strip():
            raise UserError(f"--network_args {key}: {part!r} is not 'regex=value' (e.g. {key}=single_blocks_\\d+=8)")
        try:
            re.compile(pattern.strip())
        except re.error as err:
            raise UserError(f"--network_args {key}: {pattern.strip()!r} is not a valid regular expression "
                            f"({err})") from None
        pairs.append((pattern.strip(), _number(key, number.strip(), kind)))
    return tuple(pairs)


def _in_dims(value: str) -> tuple[int, ...]:
    text = value.strip().strip("[]")
    parts = [p for p in text.split(",") if p.strip()]
    if len(parts) != 5:
        raise UserError(f"--network_args in_dims={value!r}: expected 5 ranks [{', '.join(IN_DIM_NAMES)}]")
    return tuple(_number("in_dims", p.strip(), int) for p in parts)


def parse_flux_network_kwargs(kwargs: Mapping[str, Any], network_dim: int | None = None,
                              network_alpha: float | None = None,
                              neuron_dropout: float | None = None) -> FluxLoRAOptions:
    """Validate ``--network_args`` for ``networks.lora_flux``; unknown keys get a "did you mean"."""
    get = network_args_getter(kwargs, NETWORK_ARGS, "networks.lora_flux")

    train_blocks = str(get("train_blocks") or "all")
    if train_blocks not in TRAIN_BLOCKS:
        raise UserError(f"--network_args train_blocks={train_blocks!r}: expected one of {', '.join(TRAIN_BLOCKS)}")
    ratio = {k: None if get(k) is None else _number(k, get(k), float)
             for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")}
    return FluxLoRAOptions(
        dim=4 if network_dim is None else int(network_dim),
        alpha=1.0 if network_alpha is None else float(network_alpha),
        dropout=_probability("dropout", neuron_dropout if neuron_dropout is not None else get("dropout")),
        rank_dropout=_probability("rank_dropout", get("rank_dropout")),
        module_dropout=_probability("module_dropout", get("module_dropout")),
        type_dims=tuple(None if get(k) is None else _number(k, get(k), int) for k in TYPE_DIM_ARGS),
        in_dims=None if get("in_dims") is None else _in_dims(str(get("in_dims"))),
        train_blocks=train_blocks,
        double_blocks=None if get("train_double_block_indices") is None else str(get("train_double_block_indices")),
        single_blocks=None if get("train_single_block_indices") is None else str(get("train_single_block_indices")),
        train_t5xxl=get("train_t5xxl") is not None and _flag("train_t5xxl", get("train_t5xxl")),
        verbose=get("verbose") is not None and _flag("verbose", get("verbose")),
        split_qkv=get("split_qkv") is not None and _flag("split_qkv", get("split_qkv")),
        reg_dims=_regex_pairs("network_reg_dims", get("network_reg_dims") or "", int),
        reg_lrs=_regex_pairs("network_reg_lrs", get("network_reg_lrs") or "", float),
        **ratio,
    )
