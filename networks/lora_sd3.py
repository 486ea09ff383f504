"""Kohya-format SD3 / SD3.5 LoRA (sd-scripts' ``networks.lora_sd3`` files) on diffusers' ``SD3Transformer2DModel``.

Names are sd-scripts' (and ComfyUI's): every Linear of the SAI joint blocks,
``lora_unet_joint_blocks_{i}_{x_block,context_block}_{attn_qkv,attn_proj,mlp_fc1,mlp_fc2,adaLN_modulation_1}``
and ``lora_unet_joint_blocks_{i}_x_block_attn2_{qkv,proj}`` in SD3.5 Medium's dual-attention layers (the last
block's context block has only ``attn_qkv`` and ``adaLN_modulation_1``); with ``emb_dims`` also
``lora_unet_{context_embedder,t_embedder_mlp_0,...,x_embedder_proj,final_layer_linear}``. CLIP-L is
``lora_te1_text_model_*``, CLIP-G ``lora_te2_text_model_*``, T5 ``lora_te3_encoder_block_*`` (with
``train_t5xxl=True``). On the full-size models that is 501 modules (SD3 Medium), 527 (SD3.5 Medium) and 641
(SD3.5 Large). The fused ``qkv`` LoRAs keep one shared down-projection over diffusers' split q/k/v
(``networks.lora_fused.FusedLoRAModule``); the file holds the fused shapes.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch
from torch import nn

from library.errors import UserError
from library.models.sd3.conversion import GLOBAL_MODULES, architecture_of_diffusers, module_pairs
from networks.lora import LoRAModule
from networks.lora_flux import clip_t5_targets
from networks.lora_fused import FusedLoRAModule, FusedLoRANetwork, network_from_file
from networks.lora_fused_options import parse_block_selection
from networks.lora_sd3_options import SHAPE_ARGS, SD3LoRAOptions, parse_sd3_network_kwargs

logger = logging.getLogger(__name__)

PREFIX_UNET = "lora_unet"
PREFIX_CLIP_L, PREFIX_CLIP_G, PREFIX_T5 = "lora_te1", "lora_te2", "lora_te3"
# emb_dims order [context_embedder, t_embedder, x_embedder, y_embedder, final_mod, final_linear] by SAI module
_EMB_INDEX = {"context_embedder": 0, "t_embedder.mlp.0": 1, "t_embedder.mlp.2": 1, "x_embedder.proj": 2,
              "y_embedder.mlp.0": 3, "y_embedder.mlp.2": 3, "final_layer.adaLN_modulation.1": 4,
              "final_layer.linear": 5}


def lora_name(sai_path: str) -> str:
    """sd-scripts' name of the LoRA on the SAI module ``sai_path``."""
    return f"{PREFIX_UNET}_{sai_path.replace('.', '_')}"


def sd3_block_targets(transformer: nn.Module, options: SD3LoRAOptions
                      ) -> list[tuple[str, list[nn.Module], bool, int, float]]:
    """(name, diffusers layers, rows swapped, rank, alpha) of every MMDiT module that gets a LoRA."""
    arch = architecture_of_diffusers({k: v.shape for k, v in transformer.state_dict().items()})
    selected = parse_block_selection(options.block_indices, arch.depth, "train_block_indices")
    globals_ = {sai for sai, _, _ in GLOBAL_MODULES}
    found = []
    for sai, parts, swapped in module_pairs(arch):
        name = lora_name(sai)
        if sai in globals_:
            rank = options.listed_rank(name, options.emb_dims, _EMB_INDEX[sai])
        else:
            rank = options.rank_for(name, selected[int(sai.split(".")[1])])
        if rank is not None:
            found.append((name, [transformer.get_submodule(p) for p in parts], swapped, *rank))
    return found


def _text_encoders(text_encoders: Any) -> list[nn.Module | None]:
    """[CLIP-L, CLIP-G, T5] from sd-scripts' list (any may be None or missing)."""
    if text_encoders is None:
        return [None, None, None]
    if not isinstance(text_encoders, (list, tuple)):
        return [text_encoders, None, None]
    return (list(text_encoders) + [None, None, None])[:3]


class SD3LoRANetwork(FusedLoRANetwork):
    """SD3 / SD3.5 LoRA with the kohya network interface (see the module docstring)."""

    TEXT_ENCODER_GROUPS = ((PREFIX_CLIP_L, "textencoder1"), (PREFIX_CLIP_G, "textencoder2"),
                           (PREFIX_T5, "textencoder3"))

    def __init__(self, text_encoders: Any, transformer: nn.Module | None, options: SD3LoRAOptions,
                 multiplier: float = 1.0):
        super().__init__(options, multiplier)
        self.diffusers_paths: dict[str, list[str]] = {}  # lora name -> diffusers module of each part
        clip_l, clip_g, t5 = _text_encoders(text_encoders)
        te_paths = {id(m): f"{root}.{name}" for root, te in (("text_encoder", clip_l), ("text_encoder_2", clip_g))
                    if te is not None for name, m in te.named_modules()}
        for name, module in self._add_text_encoder_loras(clip_t5_targets([clip_l, clip_g], t5, options)):
            if id(module) in te_paths:
                self.diffusers_paths[name] = [te_paths[id(module)]]
        if transformer is not None:
            paths = {id(m): f"transformer.{name}" for name, m in transformer.named_modules()}
            for name, parts, swapped, dim, alpha in sd3_block_targets(transformer, options):
                self.diffusers_paths[name] = [paths[id(p)] for p in parts]
                if isinstance(parts[0], nn.Conv2d):  # the patch embedding
                    lora = LoRAModule(name, parts[0], multiplier, dim, alpha, **self._dropouts())
                else:
                    lora = FusedLoRAModule(name, parts, multiplier, dim, alpha, swap_halves=swapped, **self._dropouts())
                self._add(lora, self.unet_loras)
        self._log_modules(logger, "SD3 LoRA: %d text encoder modules, %d MMDiT modules")

    def diffusers_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The network in the PEFT layout ``StableDiffusion3Pipeline.load_lora_weights`` reads
        (``transformer.<module>.lora_A/lora_B.weight``, ``text_encoder{,_2}.…``): each fused LoRA becomes one
        ``lora_A`` (the shared down-projection) per split layer with that layer's rows of ``lora_up``, and
        ``alpha / r`` is folded into ``lora_B`` (diffusers applies it at scale 1). diffusers has no T5 LoRA, so
        T5 modules cannot be written (:func:`diffusers_format_problem`)."""
        out: dict[str, torch.Tensor] = {}
        for lora in self.all_loras():
            if lora.lora_name not in self.diffusers_paths:
                raise UserError(f"{lora.lora_name}: diffusers' SD3 LoRA loader has no place for this module (T5); "
                                "save in sd-scripts' format instead")
            down = lora.lora_down.weight.detach()
            up = lora.lora_up.weight.detach() * float(lora.alpha) / lora.lora_dim
            for part, path in enumerate(self.diffusers_paths[lora.lora_name]):
                rows = lora._rows(part) if isinstance(lora, FusedLoRAModule) else slice(None)
                out[f"{path}.lora_A.weight"] = down.clone()
                out[f"{path}.lora_B.weight"] = up[rows]
        return {k: v.to("cpu", dtype or v.dtype).contiguous() for k, v in out.items()}


def diffusers_format_problem(options: SD3LoRAOptions) -> str | None:
    """Why these network options cannot be saved in diffusers' format, or None."""
    if options.train_t5xxl:
        return ("--save_lora_format diffusers: diffusers' StableDiffusion3Pipeline loads no T5 LoRA, so "
                "train_t5xxl=True cannot be saved that way; remove one of them")
    return None


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoders: Any, mmdit: nn.Module | None, neuron_dropout: float | None = None,
                   **kwargs: Any) -> SD3LoRANetwork:
    """A fresh SD3 LoRA (``network_dim`` default 4, ``network_alpha`` default 1); ``kwargs`` are ``--network_args``."""
    options = parse_sd3_network_kwargs(kwargs, network_dim, network_alpha, neuron_dropout)
    return SD3LoRANetwork(text_encoders, mmdit, options, multiplier)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoders: Any,
                                mmdit: nn.Module | None, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, **kwargs: Any) -> tuple[SD3LoRANetwork, dict]:
    """A network shaped like an SD3 LoRA file (ranks and alphas from the file); the weights are not loaded."""
    return network_from_file(
        lambda options: SD3LoRANetwork(text_encoders, mmdit, options, multiplier), parse_sd3_network_kwargs,
        SHAPE_ARGS, file, weights_sd, kwargs, model="SD3 model", for_inference=for_inference,
        hint="is the file for another model family or variant, or does it train T5 while no T5 was given?")
