"""``--network_args`` of ``networks.lora_sd3`` (sd-scripts' names): per-type ranks, embedder ranks, block
selection, T5 training, LoRA+ and dropouts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from library.errors import UserError
from networks.lora_flux_options import _flag, _number, _probability, network_args_getter

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


@dataclass(frozen=True)
class SD3LoRAOptions:
    """Parsed ``--network_args`` (plus ``--network_dim``/``--network_alpha``/``--network_dropout``)."""

    dim: int = 4
    alpha: float = 1.0
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    type_dims: tuple[int | None, ...] = (None,) * 6
    emb_dims: tuple[int, ...] | None = None
    block_indices: str | None = None  # train_block_indices as given ("all", "0,2-4", ...)
    train_t5xxl: bool = False
    verbose: bool = False
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    modules_dim: Mapping[str, int] | None = field(default=None, repr=False)
    modules_alpha: Mapping[str, float] | None = field(default=None, repr=False)

    def rank_for(self, lora_name: str, selected: bool = True) -> tuple[int, float] | None:
        """``(rank, alpha)`` of a joint-block or text-encoder module (``selected``: its block trains), or None."""
        if self.modules_dim is not None:
            return self._from_file(lora_name)
        dim = self.dim
        for type_dim, fragments in zip(self.type_dims, _TYPE_FRAGMENTS):
            if type_dim is not None and all(f in lora_name for f in fragments):
                dim = type_dim
                break
        return (dim, self.alpha) if dim and selected else None

    def embedder_rank(self, lora_name: str, index: int) -> tuple[int, float] | None:
        """``(rank, alpha)`` of embedder/final-layer module ``index`` of ``emb_dims``, or None."""
        if self.modules_dim is not None:
            return self._from_file(lora_name)
        if not self.emb_dims or not self.emb_dims[index]:
            return None
        return self.emb_dims[index], self.alpha

    def _from_file(self, lora_name: str) -> tuple[int, float] | None:
        if lora_name not in (self.modules_dim or {}):
            return None
        dim = self.modules_dim[lora_name]
        return dim, (self.modules_alpha or {}).get(lora_name, dim)


def _emb_dims(value: str) -> tuple[int, ...]:
    parts = [p for p in value.strip().strip("[]").split(",") if p.strip()]
    if len(parts) != 6:
        raise UserError(f"--network_args emb_dims={value!r}: expected 6 ranks [{', '.join(EMB_DIM_NAMES)}]")
    return tuple(_number("emb_dims", p.strip(), int) for p in parts)


def parse_sd3_network_kwargs(kwargs: Mapping[str, Any], network_dim: int | None = None,
                             network_alpha: float | None = None,
                             neuron_dropout: float | None = None) -> SD3LoRAOptions:
    """Validate ``--network_args`` for ``networks.lora_sd3``; unknown keys get a "did you mean"."""
    get = network_args_getter(kwargs, NETWORK_ARGS, "networks.lora_sd3")

    if get("split_qkv") is not None and _flag("split_qkv", get("split_qkv")):
        raise UserError("--network_args split_qkv=True is not supported: the fused qkv LoRA is what ComfyUI and "
                        "sd-scripts read; remove split_qkv")
    if get("conv_dim") is not None:
        raise UserError("--network_args conv_dim: the SD3 joint blocks have no convolutions (sd-scripts ignores it); "
                        "for the patch embedding use emb_dims=[0,0,r,0,0,0]")
    ratio = {k: None if get(k) is None else _number(k, get(k), float)
             for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")}
    return SD3LoRAOptions(
        dim=4 if network_dim is None else int(network_dim),
        alpha=1.0 if network_alpha is None else float(network_alpha),
        dropout=_probability("dropout", neuron_dropout if neuron_dropout is not None else get("dropout")),
        rank_dropout=_probability("rank_dropout", get("rank_dropout")),
        module_dropout=_probability("module_dropout", get("module_dropout")),
        type_dims=tuple(None if get(k) is None else _number(k, get(k), int) for k in TYPE_DIM_ARGS),
        emb_dims=None if get("emb_dims") is None else _emb_dims(str(get("emb_dims"))),
        block_indices=None if get("train_block_indices") is None else str(get("train_block_indices")),
        train_t5xxl=get("train_t5xxl") is not None and _flag("train_t5xxl", get("train_t5xxl")),
        verbose=get("verbose") is not None and _flag("verbose", get("verbose")),
        **ratio,
    )
