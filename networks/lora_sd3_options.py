"""``--network_args`` of ``networks.lora_sd3`` (sd-scripts' names): per-type ranks, embedder ranks, block
selection, T5 training, LoRA+ and dropouts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from library.errors import UserError
from networks.lora_fused_options import (
    FusedLoRAOptions, common_option_values, given_flag, network_args_getter, rank_list, refuse_split_qkv,
)

# sd-scripts' type_dims order and the name fragments that pick a module's type (all must occur in the name)
TYPE_DIM_ARGS = ("context_attn_dim", "context_mlp_dim", "context_mod_dim", "x_attn_dim", "x_mlp_dim", "x_mod_dim")
_TYPE_FRAGMENTS = (("context_block", "attn"), ("context_block", "mlp"), ("context_block", "adaLN_modulation"),
                   ("x_block", "attn"), ("x_block", "mlp"), ("x_block", "adaLN_modulation"))
EMB_DIM_NAMES = ("context", "t", "x", "y", "final_mod", "final_linear")
NETWORK_ARGS = TYPE_DIM_ARGS + (
    "emb_dims", "train_block_indices", "train_t5xxl", "split_qkv", "verbose", "dropout", "rank_dropout",
    "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "conv_dim",
    "conv_alpha",
)
SHAPE_ARGS = TYPE_DIM_ARGS + ("emb_dims", "train_block_indices")


@dataclass(frozen=True, kw_only=True)
class SD3LoRAOptions(FusedLoRAOptions):
    """Parsed ``--network_args`` (plus ``--network_dim``/``--network_alpha``/``--network_dropout``)."""

    TYPE_FRAGMENTS: ClassVar[tuple[tuple[str, ...], ...]] = _TYPE_FRAGMENTS

    type_dims: tuple[int | None, ...] = (None,) * 6
    emb_dims: tuple[int, ...] | None = None
    block_indices: str | None = None  # train_block_indices as given ("all", "0,2-4", ...)
    train_t5xxl: bool = False


def parse_sd3_network_kwargs(kwargs: Mapping[str, Any], network_dim: int | None = None,
                             network_alpha: float | None = None,
                             neuron_dropout: float | None = None) -> SD3LoRAOptions:
    """Validate ``--network_args`` for ``networks.lora_sd3``; unknown keys get a "did you mean"."""
    get = network_args_getter(kwargs, NETWORK_ARGS, "networks.lora_sd3")

    refuse_split_qkv(get)
    if get("conv_dim") is not None:
        raise UserError("--network_args conv_dim: the SD3 joint blocks have no convolutions (sd-scripts ignores it); "
                        "for the patch embedding use emb_dims=[0,0,r,0,0,0]")
    return SD3LoRAOptions(
        **common_option_values(get, TYPE_DIM_ARGS, network_dim, network_alpha, neuron_dropout),
        emb_dims=None if get("emb_dims") is None else rank_list("emb_dims", str(get("emb_dims")), EMB_DIM_NAMES),
        block_indices=None if get("train_block_indices") is None else str(get("train_block_indices")),
        train_t5xxl=given_flag(get, "train_t5xxl"),
        verbose=given_flag(get, "verbose"),
    )
