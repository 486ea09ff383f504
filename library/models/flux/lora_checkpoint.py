"""FLUX.1 as the LoRA tools see it: the transformer alone (what the BFL single file holds; ``FluxSpec.save``
writes it back) and its kohya LoRA targets (sd-scripts' fused-layer names over diffusers' split layers).

The CLIP-L / T5 / AE files are not needed to merge a LoRA into the transformer or to extract one from two
transformers; LoRA text encoder modules then match nothing and are reported as such.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from library.models.families.base import ModelFamily


def load_transformer_for_lora(args: argparse.Namespace, family: ModelFamily, dtype: torch.dtype) -> Any:
    """The transformer of a BFL single file (ComfyUI prefix too) or a diffusers folder, as ``SDModels`` with no
    text encoders and no AE."""
    from library.models.flux.loading import load_transformer
    from library.models.loading import SDModels, resolve_model_path

    source = resolve_model_path(args.pretrained_model_name_or_path)
    transformer = load_transformer(source, dtype)
    return SDModels(family=family, unet=transformer, vae=None, text_encoders=[], tokenizers=[], source=str(source))


def flux_lora_targets(text_encoders: list, transformer: nn.Module | None) -> dict[str, tuple[nn.Module, ...]]:
    """Every module of sd-scripts' FLUX LoRA (all double/single block layers, the embedders of ``in_dims``,
    CLIP-L as ``lora_te1_``, T5 as ``lora_te3_``), each with its diffusers layers in fused row order."""
    from networks.lora import find_target_modules
    from networks.lora_flux import flux_block_targets, t5_targets
    from networks.lora_flux_options import FluxLoRAOptions

    clip = text_encoders[0] if text_encoders else None
    t5 = text_encoders[1] if len(text_encoders) > 1 else None
    found: dict[str, tuple[nn.Module, ...]] = {}
    if clip is not None:
        found.update({t.lora_name: (t.module,) for t in find_target_modules([clip, None], None, False)})
    if t5 is not None:
        found.update({name: (module,) for name, module in t5_targets(t5)})
    if transformer is not None:
        every = FluxLoRAOptions(dim=1, in_dims=(1,) * 5)
        found.update({name: tuple(parts) for name, parts, _, _ in flux_block_targets(transformer, every)})
    return found
