"""SD3 / SD3.5 as the LoRA tools see it: the SAI single file's tensors as stored
(``library.lora_tools.stored``). sd-scripts' ``networks.lora_sd3`` modules name the file's layers: the MMDiT under
``model.diffusion_model.`` (or unprefixed) as ``lora_unet_``, the text encoders inside the file as ``lora_te1_``
(CLIP-L), ``lora_te2_`` (CLIP-G) and ``lora_te3_`` (T5-XXL). The fused ``qkv`` layers and the (shift, scale)
modulations are in the file's own row order, which is the order of the LoRA's ``lora_up`` rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection

import torch

from library.errors import UserError
from library.lora_tools.stored import CLIP_LAYERS, T5_LAYERS, StoredCheckpoint, StoredPart, name_filter, read_stored
from library.models.families.base import ModelFamily
from library.models.sd3.conversion import SAI_PREFIX, TEXT_PREFIXES, VAE_PREFIX, layout_of

_MMDIT_LAYERS = (r"joint_blocks_\d+_(x_block|context_block)_(attn2?_(qkv|proj)|mlp_fc[12]|adaLN_modulation_1)"
                 r"|x_embedder_proj|[ty]_embedder_mlp_[02]|context_embedder|final_layer_(linear|adaLN_modulation_1)")
SD3_PART = StoredPart(
    prefixes=((SAI_PREFIX, "lora_unet"), (TEXT_PREFIXES["clip_l"], "lora_te1"), (TEXT_PREFIXES["clip_g"], "lora_te2"),
              (TEXT_PREFIXES["t5xxl"], "lora_te3"), (VAE_PREFIX, "vae"), ("", "lora_unet")),
    wanted=name_filter(f"lora_unet_({_MMDIT_LAYERS})", f"lora_te[12]_{CLIP_LAYERS}", f"lora_te3_{T5_LAYERS}"),
)


def sd3_lora_family(source: Path, keys: Collection[str] | None) -> ModelFamily:
    """The SD3 variant of a single file, from its header."""
    from library.models.families.sd3 import sd3_family
    from library.models.sd3.loading import transformer_architecture

    if keys is None or layout_of(keys) != "sai":
        raise UserError(f"{source}: the LoRA tools read SD3 models as the SAI single file (sd3_medium.safetensors, "
                        "sd3.5_large.safetensors: model.diffusion_model.joint_blocks.*), not a diffusers folder or "
                        "transformer file")
    return sd3_family(transformer_architecture(source).variant)


def read_sd3_for_lora(path: str | Path, dtype: torch.dtype | None) -> StoredCheckpoint:
    return read_stored(path, SD3_PART, dtype, "SD3 model")
