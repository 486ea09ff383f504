"""``--network_args`` of ``networks.lora_flux`` (sd-scripts' names): per-type ranks, ranks and learning rates by
regular expression (``network_reg_dims``/``network_reg_lrs``), embedder ranks, block selection, ``split_qkv``,
T5 training, LoRA+ and dropouts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from library.errors import UserError
from networks.lora_fused_options import (
    FusedLoRAOptions, _number, common_option_values, given_flag, network_args_getter, rank_list,
)
from networks.lora_fused_options import parse_block_selection  # noqa: F401  (still importable from here)

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


@dataclass(frozen=True, kw_only=True)
class FluxLoRAOptions(FusedLoRAOptions):
    """Parsed ``--network_args`` (plus ``--network_dim``/``--network_alpha``/``--network_dropout``)."""

    TYPE_FRAGMENTS: ClassVar[tuple[tuple[str, ...], ...]] = _TYPE_FRAGMENTS
    FILE_KEEPS: ClassVar[tuple[str, ...]] = FusedLoRAOptions.FILE_KEEPS + ("reg_lrs",)

    type_dims: tuple[int | None, ...] = (None,) * 8
    in_dims: tuple[int, ...] | None = None
    train_blocks: str = "all"
    double_blocks: str | None = None  # train_double_block_indices as given ("all", "0,2-4", ...)
    single_blocks: str | None = None
    train_t5xxl: bool = False
    split_qkv: bool = False
    reg_dims: tuple[tuple[str, int], ...] = ()  # (regex, rank): the first match wins, before the per-type ranks
    reg_lrs: tuple[tuple[str, float], ...] = ()  # (regex, learning rate): the first match wins

    def rank_for(self, lora_name: str, selected: bool = True) -> tuple[int, float] | None:
        """``(rank, alpha)`` of a block module (``selected``: its block is trained), or None (no LoRA)."""
        if self.modules_dim is None:
            for pattern, reg_dim in self.reg_dims:
                if re.search(pattern, lora_name):
                    return (reg_dim, self.alpha) if reg_dim and selected else None
        return super().rank_for(lora_name, selected)


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


def parse_flux_network_kwargs(kwargs: Mapping[str, Any], network_dim: int | None = None,
                              network_alpha: float | None = None,
                              neuron_dropout: float | None = None) -> FluxLoRAOptions:
    """Validate ``--network_args`` for ``networks.lora_flux``; unknown keys get a "did you mean"."""
    get = network_args_getter(kwargs, NETWORK_ARGS, "networks.lora_flux")

    train_blocks = str(get("train_blocks") or "all")
    if train_blocks not in TRAIN_BLOCKS:
        raise UserError(f"--network_args train_blocks={train_blocks!r}: expected one of {', '.join(TRAIN_BLOCKS)}")
    return FluxLoRAOptions(
        **common_option_values(get, TYPE_DIM_ARGS, network_dim, network_alpha, neuron_dropout),
        in_dims=None if get("in_dims") is None else rank_list("in_dims", str(get("in_dims")), IN_DIM_NAMES),
        train_blocks=train_blocks,
        double_blocks=None if get("train_double_block_indices") is None else str(get("train_double_block_indices")),
        single_blocks=None if get("train_single_block_indices") is None else str(get("train_single_block_indices")),
        train_t5xxl=given_flag(get, "train_t5xxl"),
        verbose=given_flag(get, "verbose"),
        split_qkv=given_flag(get, "split_qkv"),
        reg_dims=_regex_pairs("network_reg_dims", get("network_reg_dims") or "", int),
        reg_lrs=_regex_pairs("network_reg_lrs", get("network_reg_lrs") or "", float),
    )
