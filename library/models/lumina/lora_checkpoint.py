"""Lumina Image 2.0 as the LoRA tools see it: the Next-DiT single file's tensors as stored
(``library.lora_tools.stored``). sd-scripts' ``networks.lora_lumina`` modules name the file's layers
(``lora_unet_layers_0_attention_qkv`` is ``layers.0.attention.qkv.weight``, with or without ComfyUI's
``model.diffusion_model.`` prefix). The Gemma2 text encoder is another file: ``lora_te_`` modules match nothing here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection

import torch

from library.errors import UserError
from library.lora_tools.stored import StoredCheckpoint, StoredPart, name_filter, read_stored
from library.models.families.base import ModelFamily
from library.models.lumina.conversion import COMFY_PREFIX, layout_of

LUMINA_PART = StoredPart(
    prefixes=((COMFY_PREFIX, "lora_unet"), ("", "lora_unet")),
    wanted=name_filter(r"lora_unet_(layers|noise_refiner|context_refiner)_\d+_(attention_(qkv|out)|feed_forward_w[123]"
                       r"|adaLN_modulation_1)", r"lora_unet_final_layer_(linear|adaLN_modulation_1)",
                       r"lora_unet_(x_embedder|t_embedder_mlp_[02]|cap_embedder_1)"),
)


def lumina_lora_family(source: Path, keys: Collection[str] | None) -> ModelFamily:
    from library.models.families.lumina import lumina_family

    if keys is None or layout_of(keys) != "nextdit":
        raise UserError(f"{source}: the LoRA tools read Lumina models as the Next-DiT single file "
                        "(lumina_2_model_bf16.safetensors: layers.N.attention.qkv...), not a diffusers folder or file")
    return lumina_family()


def read_lumina_for_lora(path: str | Path, dtype: torch.dtype | None) -> StoredCheckpoint:
    return read_stored(path, LUMINA_PART, dtype, "Lumina model")
