"""Kohya-format FLUX.1 LoRA (sd-scripts' ``networks.lora_flux`` files) on diffusers' ``FluxTransformer2DModel``.

sd-scripts puts its LoRAs on the original (BFL) layers, where q, k and v (and, in single blocks, the MLP input)
are one fused ``Linear`` with one shared down-projection. diffusers computes with split layers
(``to_q``/``to_k``/``to_v``/``proj_mlp``; its outputs equal the original model's). :class:`FusedLoRAModule`
keeps sd-scripts' parameterisation on the split layers: one ``lora_down [r, in]`` shared by every part and
one ``lora_up [sum(out), r]`` whose row blocks feed each part, so the file holds the fused shapes and
``W_part += scale * up[rows of part] @ down`` is exactly the fused update.

Names (sd-scripts'): ``lora_unet_double_blocks_{i}_{img,txt}_{attn_qkv,attn_proj,mlp_0,mlp_2,mod_lin}``,
``lora_unet_single_blocks_{i}_{linear1,linear2,modulation_lin}`` (FLUX.1-dev: 19 x 10 + 38 x 3 = 304),
with ``in_dims`` also ``lora_unet_{img_in,time_in_*,vector_in_*,guidance_in_*,txt_in}``; CLIP-L as
``lora_te1_text_model_encoder_layers_*`` (72 modules), T5 as ``lora_te3_encoder_block_*`` with ``train_t5xxl``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch
from torch import nn

from library.errors import UserError
from networks.lora import find_target_modules
from networks.lora_fused import FusedLoRAModule, FusedLoRANetwork, linear_targets, network_from_file
from networks.lora_fused_options import FusedLoRAOptions
from networks.lora_flux_options import (
    SHAPE_ARGS, FluxLoRAOptions, parse_block_selection, parse_flux_network_kwargs,
)

logger = logging.getLogger(__name__)

PREFIX_UNET = "lora_unet"
PREFIX_CLIP = "lora_te1"
PREFIX_T5 = "lora_te3"
T5_TARGETS = ("T5Attention", "T5DenseGatedActDense")
# (sd-scripts module name within a block, diffusers layers in fused row order)
DOUBLE_TARGETS = (
    ("img_mod_lin", ("norm1.linear",)), ("img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("img_attn_proj", ("attn.to_out.0",)), ("img_mlp_0", ("ff.net.0.proj",)), ("img_mlp_2", ("ff.net.2",)),
    ("txt_mod_lin", ("norm1_context.linear",)),
    ("txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("txt_attn_proj", ("attn.to_add_out",)), ("txt_mlp_0", ("ff_context.net.0.proj",)),
    ("txt_mlp_2", ("ff_context.net.2",)),
)
SINGLE_TARGETS = (
    ("modulation_lin", ("norm.linear",)), ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),
)
# in_dims order [img, time, vector, guidance, txt] -> (name, diffusers layer)
EMBEDDER_TARGETS = (
    (("img_in", "x_embedder"),),
    (("time_in_in_layer", "time_text_embed.timestep_embedder.linear_1"),
     ("time_in_out_layer", "time_text_embed.timestep_embedder.linear_2")),
    (("vector_in_in_layer", "time_text_embed.text_embedder.linear_1"),
     ("vector_in_out_layer", "time_text_embed.text_embedder.linear_2")),
    (("guidance_in_in_layer", "time_text_embed.guidance_embedder.linear_1"),
     ("guidance_in_out_layer", "time_text_embed.guidance_embedder.linear_2")),
    (("txt_in", "context_embedder"),),
)


def _get(root: nn.Module, path: str) -> nn.Linear:
    return root.get_submodule(path)


def flux_block_targets(transformer: nn.Module, options: FluxLoRAOptions) -> list[tuple[str, list[nn.Linear], int, float]]:
    """(name, diffusers layers, rank, alpha) of every FLUX transformer module that gets a LoRA."""
    n_double, n_single = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
    double = parse_block_selection(options.double_blocks, n_double, "train_double_block_indices")
    single = parse_block_selection(options.single_blocks, n_single, "train_single_block_indices")
    found = []
    kinds = [("double_blocks", "transformer_blocks", DOUBLE_TARGETS, double),
             ("single_blocks", "single_transformer_blocks", SINGLE_TARGETS, single)]
    for bfl, dif, targets, selected in kinds:
        if options.modules_dim is None and options.train_blocks not in ("all", bfl.split("_")[0]):
            continue
        for i in range(len(selected)):
            for suffix, parts in targets:
                name = f"{PREFIX_UNET}_{bfl}_{i}_{suffix}"
                rank = options.rank_for(name, selected[i])
                if rank is not None:
                    found.append((name, [_get(transformer, f"{dif}.{i}.{p}") for p in parts], *rank))
    for k, group in enumerate(EMBEDDER_TARGETS):
        for suffix, path in group:
            name = f"{PREFIX_UNET}_{suffix}"
            rank = options.listed_rank(name, options.in_dims, k)
            if rank is not None:
                try:
                    found.append((name, [_get(transformer, path)], *rank))
                except AttributeError:  # schnell has no guidance embedder
                    if options.modules_dim is not None:
                        raise UserError(f"{name}: the LoRA has a module this model does not have (a dev LoRA on "
                                        "schnell?)") from None
    return found


def t5_targets(t5: nn.Module) -> list[tuple[str, nn.Linear]]:
    """T5 attention and gated-MLP Linear layers with sd-scripts' ``lora_te3_`` names."""
    return linear_targets(t5, T5_TARGETS, PREFIX_T5)


def clip_t5_targets(clips: list[nn.Module | None], t5: nn.Module | None, options: FusedLoRAOptions
                    ) -> list[tuple[str, nn.Module]]:
    """The CLIP layers (sd-scripts' ``lora_te1_``/``lora_te2_`` names) and T5's when it trains (``train_t5xxl``,
    or a file's modules)."""
    targets = [(t.lora_name, t.module) for t in find_target_modules(clips, None, False)]
    if t5 is not None and (options.train_t5xxl or options.modules_dim is not None):
        targets += t5_targets(t5)
    return targets


def _text_encoders(text_encoders: Any) -> tuple[nn.Module | None, nn.Module | None]:
    """(CLIP-L, T5) from sd-scripts' ``[clip_l, t5xxl]`` list (either may be None or missing)."""
    if text_encoders is None:
        return None, None
    if not isinstance(text_encoders, (list, tuple)):
        return text_encoders, None
    items = list(text_encoders) + [None, None]
    return items[0], items[1]


class FluxLoRANetwork(FusedLoRANetwork):
    """FLUX.1 LoRA with the kohya network interface (``apply_to``, ``prepare_optimizer_params``, save/load/merge).

    It shares everything but module discovery with ``networks.lora_fused.FusedLoRANetwork``.
    """

    TEXT_ENCODER_GROUPS = ((PREFIX_CLIP, "textencoder1"), (PREFIX_T5, "textencoder3"))

    def __init__(self, text_encoders: Any, transformer: nn.Module | None, options: FluxLoRAOptions,
                 multiplier: float = 1.0):
        super().__init__(options, multiplier)
        clip, t5 = _text_encoders(text_encoders)
        self._add_text_encoder_loras(clip_t5_targets([clip, None], t5, options))
        if transformer is not None:
            for name, parts, dim, alpha in flux_block_targets(transformer, options):
                self._add(FusedLoRAModule(name, parts, multiplier, dim, alpha, **self._dropouts(),
                                          split=options.split_qkv), self.unet_loras)
        self._log_modules(logger, "FLUX LoRA: %d text encoder modules, %d transformer modules")


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, ae: Any,
                   text_encoders: Any, flux: nn.Module | None, neuron_dropout: float | None = None,
                   **kwargs: Any) -> FluxLoRANetwork:
    """A fresh FLUX LoRA (``network_dim`` default 4, ``network_alpha`` default 1); ``kwargs`` are ``--network_args``."""
    options = parse_flux_network_kwargs(kwargs, network_dim, network_alpha, neuron_dropout)
    return FluxLoRANetwork(text_encoders, flux, options, multiplier)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, ae: Any, text_encoders: Any,
                                flux: nn.Module | None, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, **kwargs: Any) -> tuple[FluxLoRANetwork, dict]:
    """A network shaped like a FLUX LoRA file (ranks and alphas from the file); the weights are not loaded."""
    return network_from_file(
        lambda options: FluxLoRANetwork(text_encoders, flux, options, multiplier), parse_flux_network_kwargs,
        SHAPE_ARGS, file, weights_sd, kwargs, model="FLUX model", for_inference=for_inference,
        hint="is the file for another model family, or does it train T5 while no T5 was given?")
