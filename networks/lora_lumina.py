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
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from library.errors import UserError
from networks.lora import LoRAModule
from networks.lora_fused import FusedLoRAModule, FusedLoRANetwork, network_for_file, shapes_from_file
from networks.lora_flux_options import _flag, _number, _probability, network_args_getter

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
_TYPE_FRAGMENTS = ("attention", "feed_forward", "modulation", "refiner")
TRAIN_BLOCKS = {"all": None, "transformer": ("layers_",), "refiners": ("noise_refiner", "context_refiner"),
                "noise_refiner": ("noise_refiner",), "context_refiner": ("context_refiner",)}
NETWORK_ARGS = TYPE_DIM_ARGS + ("embedder_dims", "train_blocks", "split_qkv", "verbose", "dropout", "rank_dropout",
                                "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                                "loraplus_text_encoder_lr_ratio")
SHAPE_ARGS = TYPE_DIM_ARGS + ("embedder_dims", "train_blocks")


@dataclass(frozen=True)
class LuminaLoRAOptions:
    """Parsed ``--network_args`` (plus ``--network_dim``/``--network_alpha``/``--network_dropout``)."""

    dim: int = 4
    alpha: float = 1.0
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    type_dims: tuple[int | None, ...] = (None,) * 4
    embedder_dims: tuple[int, int, int] | None = None
    train_blocks: str = "all"
    verbose: bool = False
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    modules_dim: Mapping[str, int] | None = field(default=None, repr=False)
    modules_alpha: Mapping[str, float] | None = field(default=None, repr=False)

    def rank_for(self, lora_name: str, default: int | None = None) -> tuple[int, float] | None:
        """``(rank, alpha)`` of a module, or None (no LoRA). ``default`` is an embedder's rank."""
        if self.modules_dim is not None:
            if lora_name not in self.modules_dim:
                return None
            dim = self.modules_dim[lora_name]
            return dim, (self.modules_alpha or {}).get(lora_name, dim)
        dim = self.dim if default is None else default
        if default is None:
            for type_dim, fragment in zip(self.type_dims, _TYPE_FRAGMENTS):
                if type_dim is not None and fragment in lora_name:
                    dim = type_dim
                    break
        return (dim, self.alpha) if dim else None


def parse_lumina_network_kwargs(kwargs: Mapping[str, Any], network_dim: int | None = None,
                                network_alpha: float | None = None,
                                neuron_dropout: float | None = None) -> LuminaLoRAOptions:
    """Validate ``--network_args`` for ``networks.lora_lumina``; unknown keys get a "did you mean"."""
    get = network_args_getter(kwargs, NETWORK_ARGS, "networks.lora_lumina")

    if get("split_qkv") is not None and _flag("split_qkv", get("split_qkv")):
        raise UserError("--network_args split_qkv=True is not supported: the fused qkv LoRA is what ComfyUI and "
                        "sd-scripts read; remove split_qkv")
    train_blocks = str(get("train_blocks") or "all")
    if train_blocks not in TRAIN_BLOCKS:
        raise UserError(f"--network_args train_blocks={train_blocks!r}: expected one of {', '.join(TRAIN_BLOCKS)}")
    embedder_dims = None
    if get("embedder_dims") is not None:
        parts = [p.strip() for p in str(get("embedder_dims")).strip().strip("[]").split(",") if p.strip()]
        if len(parts) != 3:
            raise UserError(f"--network_args embedder_dims={get('embedder_dims')!r}: expected 3 ranks "
                            "[x_embedder, t_embedder, cap_embedder]")
        embedder_dims = tuple(_number("embedder_dims", p, int) for p in parts)
    ratio = {k: None if get(k) is None else _number(k, get(k), float)
             for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")}
    return LuminaLoRAOptions(
        dim=4 if network_dim is None else int(network_dim),
        alpha=1.0 if network_alpha is None else float(network_alpha),
        dropout=_probability("dropout", neuron_dropout if neuron_dropout is not None else get("dropout")),
        rank_dropout=_probability("rank_dropout", get("rank_dropout")),
        module_dropout=_probability("module_dropout", get("module_dropout")),
        type_dims=tuple(None if get(k) is None else _number(k, get(k), int) for k in TYPE_DIM_ARGS),
        embedder_dims=embedder_dims, train_blocks=train_blocks,
        verbose=get("verbose") is not None and _flag("verbose", get("verbose")), **ratio,
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
            if options.modules_dim is not None:
                rank = options.rank_for(name)
            else:
                rank = options.rank_for(name, options.embedder_dims[k]) if options.embedder_dims else None
            if rank is not None:
                found.append((name, [transformer.get_submodule(path)], *rank))
    return found


def gemma_targets(gemma: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Gemma2 attention and MLP Linear layers with sd-scripts' ``lora_te_`` names."""
    found = []
    for name, module in gemma.named_modules():
        if type(module).__name__ in TE_TARGETS:
            for child_name, child in module.named_modules():
                if isinstance(child, nn.Linear):
                    found.append((f"{PREFIX_TE}_{name}.{child_name}".replace(".", "_"), child))
    return found


def _gemma(text_encoders: Any) -> nn.Module | None:
    if isinstance(text_encoders, (list, tuple)):
        return text_encoders[0] if text_encoders else None
    return text_encoders


class LuminaLoRANetwork(FusedLoRANetwork):
    """Lumina 2 LoRA with the kohya network interface (``apply_to``, ``prepare_optimizer_params``, save/load/merge)."""

    TEXT_ENCODER_GROUPS = ((PREFIX_TE, "textencoder"),)

    def __init__(self, text_encoders: Any, transformer: nn.Module | None, options: LuminaLoRAOptions,
                 multiplier: float = 1.0):
        nn.Module.__init__(self)
        self.options = options
        self.multiplier = multiplier
        self.applied = False
        self.dropped: list[str] = []
        self.text_encoder_loras: list[nn.Module] = []
        self.unet_loras: list[nn.Module] = []
        drop = dict(dropout=options.dropout, rank_dropout=options.rank_dropout, module_dropout=options.module_dropout)
        gemma = _gemma(text_encoders)
        for name, module in gemma_targets(gemma) if gemma is not None else []:
            rank = options.rank_for(name) if options.modules_dim is not None else (options.dim, options.alpha)
            if rank is not None:
                self._add(LoRAModule(name, module, multiplier, rank[0], rank[1], **drop), self.text_encoder_loras)
        if transformer is not None:
            for name, parts, dim, alpha in lumina_block_targets(transformer, options):
                self._add(FusedLoRAModule(name, parts, multiplier, dim, alpha, **drop), self.unet_loras)
        logger.info("Lumina LoRA: %d Gemma2 modules, %d transformer modules", len(self.text_encoder_loras),
                    len(self.unet_loras))
        if options.verbose:
            for lora in self.all_loras():
                logger.info("  %-56s rank %d alpha %g", lora.lora_name, lora.lora_dim, float(lora.alpha))


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
    source, weights_sd, modules_dim, modules_alpha = shapes_from_file(file, weights_sd)
    parsed = parse_lumina_network_kwargs({k: v for k, v in kwargs.items() if k not in SHAPE_ARGS})
    options = LuminaLoRAOptions(
        dropout=parsed.dropout, rank_dropout=parsed.rank_dropout, module_dropout=parsed.module_dropout,
        loraplus_lr_ratio=parsed.loraplus_lr_ratio, loraplus_unet_lr_ratio=parsed.loraplus_unet_lr_ratio,
        loraplus_text_encoder_lr_ratio=parsed.loraplus_text_encoder_lr_ratio,
        modules_dim=modules_dim, modules_alpha=modules_alpha,
    )
    network = LuminaLoRANetwork(text_encoders, lumina, options, multiplier)
    return network_for_file(network, source, weights_sd, modules_dim, "Lumina model",
                            "is the file for another model family?", for_inference)
