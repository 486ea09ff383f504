"""Kohya-format Lumina Image 2.0 LoRA (sd-scripts' ``networks.lora_lumina`` files, ComfyUI's names) on diffusers'
``Lumina2Transformer2DModel``.

sd-scripts puts its LoRAs on the Next-DiT layers, where q, k and v are one fused ``attention.qkv`` with one
shared down-projection; diffusers splits it into ``attn.to_q/to_k/to_v``. ``networks.lora_fused.FusedLoRAModule``
keeps the fused parameterisation on the split layers, so the file holds the fused shapes.

Names: ``lora_unet_{layers,noise_refiner,context_refiner}_{i}_{attention_qkv,attention_out,feed_forward_w1,
feed_forward_w2,feed_forward_w3,adaLN_modulation_1}`` (the context refiner has no modulation),
``lora_unet_final_layer_{linear,adaLN_modulation_1}``, with ``embedder_dims=[x,t,cap]`` also
``lora_unet_x_embedder``, ``lora_unet_t_embedder_mlp_{0,2}``, ``lora_unet_cap_embedder_1``; Gemma2 as
``lora_te_layers_{i}_{self_attn_{q,k,v,o}_proj,mlp_{gate,up,down}_proj}``. Lumina 2 (2B): 180 transformer + 182
Gemma2 modules = 362, sd-scripts' set.

``--network_args`` (sd-scripts' names): ``attn_dim``, ``mlp_dim``, ``mod_dim``, ``refiner_dim`` (the first that
matches a module wins, in that order), ``embedder_dims``, ``train_blocks=all|transformer|refiners|noise_refiner|
context_refiner``, ``verbose``, dropouts, LoRA+ ratios. ``mlp_dim`` sets the feed-forward ranks (in sd-scripts
it matches no module and does nothing). ``split_qkv=True`` is refused.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from library.errors import UserError
from networks.lora_fused import FusedLoRAModule, FusedLoRANetwork, linear_targets, network_from_file
from networks.lora_fused_options import (
    FusedLoRAOptions, common_option_values, given_flag, network_args_getter, rank_list, refuse_split_qkv,
)

logger = logging.getLogger(__name__)

PREFIX_UNET = "lora_unet"
PREFIX_TE = "lora_te"
TE_TARGETS = ("Gemma2Attention", "Gemma2MLP")
# (sd-scripts module name within a block, diffusers layers in fused row order)
BLOCK_TARGETS = (
    ("attention_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")), ("attention_out", ("attn.to_out.0",)),
    ("feed_forward_w1", ("feed_forward.linear_1",)), ("feed_forward_w2", ("feed_forward.linear_2",)),
    ("feed_forward_w3", ("feed_forward.linear_3",)), ("adaLN_modulation_1", ("norm1.linear",)),
)
FINAL_TARGETS = (("final_layer_linear", "norm_out.linear_2"), ("final_layer_adaLN_modulation_1", "norm_out.linear_1"))
EMBEDDER_TARGETS = (  # embedder_dims order [x, t, cap]
    (("x_embedder", "x_embedder"),),
    (("t_embedder_mlp_0", "time_caption_embed.timestep_embedder.linear_1"),
     ("t_embedder_mlp_2", "time_caption_embed.timestep_embedder.linear_2")),
    (("cap_embedder_1", "time_caption_embed.caption_embedder.1"),),
)
TYPE_DIM_ARGS = ("attn_dim", "mlp_dim", "mod_dim", "refiner_dim")
_TYPE_FRAGMENTS = (("attention",), ("feed_forward",), ("modulation",), ("refiner",))
TRAIN_BLOCKS = {"all": None, "transformer": ("layers_",), "refiners": ("noise_refiner", "context_refiner"),
                "noise_refiner": ("noise_refiner",), "context_refiner": ("context_refiner",)}
NETWORK_ARGS = TYPE_DIM_ARGS + ("embedder_dims", "train_blocks", "split_qkv", "verbose", "dropout", "rank_dropout",
                                "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                                "loraplus_text_encoder_lr_ratio")
SHAPE_ARGS = TYPE_DIM_ARGS + ("embedder_dims", "train_blocks")


@dataclass(frozen=True, kw_only=True)
class LuminaLoRAOptions(FusedLoRAOptions):
    """Parsed ``--network_args`` (plus ``--network_dim``/``--network_alpha``/``--network_dropout``)."""

    TYPE_FRAGMENTS: ClassVar[tuple[tuple[str, ...], ...]] = _TYPE_FRAGMENTS

    type_dims: tuple[int | None, ...] = (None,) * 4
    embedder_dims: tuple[int, int, int] | None = None
    train_blocks: str = "all"

    def text_encoder_rank(self, lora_name: str) -> tuple[int, float] | None:
        """Gemma2 modules take ``dim`` (the per-type ranks are the transformer's)."""
        return self._from_file(lora_name) if self.modules_dim is not None else (self.dim, self.alpha)


def parse_lumina_network_kwargs(kwargs: Mapping[str, Any], network_dim: int | None = None,
                                network_alpha: float | None = None,
                                neuron_dropout: float | None = None) -> LuminaLoRAOptions:
    """Validate ``--network_args`` for ``networks.lora_lumina``; unknown keys get a "did you mean"."""
    get = network_args_getter(kwargs, NETWORK_ARGS, "networks.lora_lumina")

    refuse_split_qkv(get)
    train_blocks = str(get("train_blocks") or "all")
    if train_blocks not in TRAIN_BLOCKS:
        raise UserError(f"--network_args train_blocks={train_blocks!r}: expected one of {', '.join(TRAIN_BLOCKS)}")
    embedder_dims = None
    if get("embedder_dims") is not None:
        embedder_dims = rank_list("embedder_dims", get("embedder_dims"), ("x_embedder", "t_embedder", "cap_embedder"))
    return LuminaLoRAOptions(
        **common_option_values(get, TYPE_DIM_ARGS, network_dim, network_alpha, neuron_dropout),
        embedder_dims=embedder_dims, train_blocks=train_blocks, verbose=given_flag(get, "verbose"),
    )


def lumina_block_targets(transformer: nn.Module, options: LuminaLoRAOptions
                         ) -> list[tuple[str, list[nn.Linear], int, float]]:
    """(name, diffusers layers, rank, alpha) of every Lumina transformer module that gets a LoRA."""
    wanted = TRAIN_BLOCKS[options.train_blocks] if options.modules_dim is None else None
    candidates: list[tuple[str, list[str], int | None]] = []
    for kind in ("context_refiner", "noise_refiner", "layers"):
        for i, block in enumerate(getattr(transformer, kind)):
            for suffix, parts in BLOCK_TARGETS:
                if kind == "context_refiner" and suffix.startswith("adaLN"):
                    continue
                candidates.append((f"{PREFIX_UNET}_{kind}_{i}_{suffix}", [f"{kind}.{i}.{p}" for p in parts], None))
    candidates += [(f"{PREFIX_UNET}_{name}", [path], None) for name, path in FINAL_TARGETS]
    found = []
    for name, paths, _ in candidates:
        if wanted is not None and not any(w in name for w in wanted):
            continue
        rank = options.rank_for(name)
        if rank is not None:
            found.append((name, [transformer.get_submodule(p) for p in paths], *rank))
    for k, group in enumerate(EMBEDDER_TARGETS):
        for suffix, path in group:
            name = f"{PREFIX_UNET}_{suffix}"
            rank = options.listed_rank(name, options.embedder_dims, k)
            if rank is not None:
                found.append((name, [transformer.get_submodule(path)], *rank))
    return found


def gemma_targets(gemma: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Gemma2 attention and MLP Linear layers with sd-scripts' ``lora_te_`` names."""
    return linear_targets(gemma, TE_TARGETS, PREFIX_TE)


def _gemma(text_encoders: Any) -> nn.Module | None:
    if isinstance(text_encoders, (list, tuple)):
        return text_encoders[0] if text_encoders else None
    return text_encoders


class LuminaLoRANetwork(FusedLoRANetwork):
    """Lumina 2 LoRA with the kohya network interface (``apply_to``, ``prepare_optimizer_params``, save/load/merge)."""

    TEXT_ENCODER_GROUPS = ((PREFIX_TE, "textencoder"),)

    def __init__(self, text_encoders: Any, transformer: nn.Module | None, options: LuminaLoRAOptions,
                 multiplier: float = 1.0):
        super().__init__(options, multiplier)
        gemma = _gemma(text_encoders)
        self._add_text_encoder_loras(gemma_targets(gemma) if gemma is not None else [])
        if transformer is not None:
            for name, parts, dim, alpha in lumina_block_targets(transformer, options):
                self._add(FusedLoRAModule(name, parts, multiplier, dim, alpha, **self._dropouts()), self.unet_loras)
        self._log_modules(logger, "Lumina LoRA: %d Gemma2 modules, %d transformer modules")


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, ae: Any,
                   text_encoders: Any, lumina: nn.Module | None, neuron_dropout: float | None = None,
                   **kwargs: Any) -> LuminaLoRANetwork:
    """A fresh Lumina LoRA (``network_dim`` default 4, ``network_alpha`` default 1); ``kwargs`` are
    ``--network_args``."""
    options = parse_lumina_network_kwargs(kwargs, network_dim, network_alpha, neuron_dropout)
    return LuminaLoRANetwork(text_encoders, lumina, options, multiplier)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, ae: Any, text_encoders: Any,
                                lumina: nn.Module | None, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, **kwargs: Any) -> tuple[LuminaLoRANetwork, dict]:
    """A network shaped like a Lumina LoRA file (ranks and alphas from the file); the weights are not loaded."""
    return network_from_file(
        lambda options: LuminaLoRANetwork(text_encoders, lumina, options, multiplier), parse_lumina_network_kwargs,
        SHAPE_ARGS, file, weights_sd, kwargs, model="Lumina model", for_inference=for_inference,
        hint="is the file for another model family?")
