"""SD3 Medium, SD3.5 Medium and SD3.5 Large: an MMDiT trained with rectified flow, conditioned on CLIP-L and
CLIP-G (hidden states and pooled outputs) and T5, with a 16-channel VAE.

Models come as the single file (``model.diffusion_model.joint_blocks.*``, with or without the text encoders and
VAE inside), with the parts given separately (``--clip_l``, ``--clip_g``, ``--t5xxl``, ``--vae``), or as a
diffusers ``StableDiffusion3Pipeline`` folder. The variant is read from tensor shapes. The compute model is
diffusers' ``SD3Transformer2DModel``; the objective is sd-scripts' SD3 one (``library.training.flow_matching``
with ``timestep_sampling="sd3"``: the x0 estimate ``x_t - sigma * output`` against the latents).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Collection, Mapping

import torch

from library.errors import UserError
from library.models.families.base import (FLOW_MATCHING, Conditioning, FamilySpec, ModelFamily,
                                          StoredTensorLoRATools)
from library.models.sd3.conversion import layout_of

SD3_LATENT_SCALE = 1.5305
SD3_LATENT_SHIFT = 0.0609
VARIANTS = {"medium": "SD3 Medium", "5-medium": "SD3.5 Medium", "5-large": "SD3.5 Large"}


def sd3_family(variant: str, max_image_side: int | None = None) -> ModelFamily:
    """SD3 ``medium``, ``5-medium`` or ``5-large`` (sd-scripts' ``model_type``, which is also its
    ``ss_base_model_version``); ``max_image_side``: the side the checkpoint's position table covers."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SD3 variant {variant!r}; known: {', '.join(VARIANTS)}")
    return ModelFamily(
        name=f"sd3-{variant}", objective=FLOW_MATCHING, latent_scale=SD3_LATENT_SCALE, latent_shift=SD3_LATENT_SHIFT,
        bucket_step=16, default_resolution=1024, base_model_version=variant,
        modelspec_architecture=f"stable-diffusion-3-{variant}", spec_name="sd3", cache_suffix="_sd3",
        scheduler_config={"shift": 3.0}, max_image_side=max_image_side,
    )


def variant_of(family: ModelFamily) -> str:
    return family.base_model_version


def _is_sd3_folder(folder: Path) -> bool:
    config = folder / "transformer" / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("_class_name") == "SD3Transformer2DModel"
    except (OSError, ValueError):
        return False


class SD3Spec(StoredTensorLoRATools, FamilySpec):
    """SD3 / SD3.5 behind the family seam."""

    name = "sd3"
    scripts = ("sd3_train_network.py", "sd3_train.py")
    latent_channels = 16

    def recognises_file(self, keys: Collection[str]) -> bool:
        return layout_of(keys) is not None

    def recognises_folder(self, folder: Path) -> bool:
        return _is_sd3_folder(folder)

    def family(self, args: argparse.Namespace, source: Path, keys: Collection[str] | None) -> ModelFamily:
        from library.models.sd3.arguments import sd3_family_problems
        from library.models.sd3.loading import component_problems, describe_file, transformer_architecture

        if source.is_file() and (keys is None or layout_of(keys) is None):
            what = describe_file(keys) if keys is not None else "not a .safetensors file"
            raise UserError(f"{source}: this file is {what}, not an SD3 model; give --pretrained_model_name_or_path "
                            "the SD3 / SD3.5 model (sd3_medium.safetensors, sd3.5_large.safetensors or a diffusers "
                            "StableDiffusion3Pipeline folder)")
        if source.is_dir() and not _is_sd3_folder(source):
            raise UserError(f"{source}: not a diffusers SD3 folder (transformer/config.json of an "
                            "SD3Transformer2DModel is missing)")
        arch = transformer_architecture(source)
        family = sd3_family(arch.variant, max_image_side=arch.pos_embed_max_size * arch.patch_size * 8)
        problems = component_problems(args, source, keys) + sd3_family_problems(args, family, arch.depth)
        if problems:
            raise UserError.from_problems("SD3 model files", problems)
        return family

    def dataset_problems(self, family: ModelFamily, args: argparse.Namespace, params: Any) -> list[str]:
        """Buckets larger than the MMDiT's position table (diffusers would fail at the first such batch), unless
        ``--enable_scaled_pos_embed`` builds a table per resolution."""
        from library.models.sd3.pos_embed import oversized_bucket_problems

        if family.max_image_side is None or getattr(args, "enable_scaled_pos_embed", False):
            return []
        return oversized_bucket_problems(params, family.max_image_side, VARIANTS[family.base_model_version])

    def latent_family(self, source: Path, args: argparse.Namespace, *, recognised: bool) -> ModelFamily:
        """The variant read from the transformer's shapes (its VAE is inside the single file or folder)."""
        from library.models.sd3.loading import transformer_architecture

        return sd3_family(transformer_architecture(source).variant)

    def load_latent_vae(self, source: Path, family: ModelFamily) -> torch.nn.Module:
        from library.models.sd3.loading import load_sd3_vae

        return load_sd3_vae(source)

    def load(self, args: argparse.Namespace, family: ModelFamily, *, device: Any, dtype: torch.dtype) -> Any:
        from library.models.sd3.loading import load_sd3_models

        return load_sd3_models(args, family, device=device)

    def save(self, path: Path, models: Any, *, fmt: str, dtype: torch.dtype | None, metadata: dict[str, str] | None,
             epoch: int, global_step: int) -> Path:
        """The single file with every text encoder inside, or a diffusers folder (``sd3_train.py`` chooses
        which encoders go into its single files itself)."""
        from library.models.sd3.saving import save_sd3_model

        return save_sd3_model(path, models, fmt=fmt, dtype=dtype, metadata=metadata)

    def text_encoding(self, models: Any, args: argparse.Namespace) -> Any:
        from library.models.sd3.text import SD3TextEncoding

        return SD3TextEncoding.from_args(models, args)

    def conditioning(self, text: Any, batch: Mapping[str, Any], device: torch.device) -> Conditioning:
        return {k: v.to(device) for k, v in text.items()}

    def forward(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning, dtype: torch.dtype) -> torch.Tensor:
        """``timesteps`` are ``1000 * sigma``; the output is the MMDiT's raw output (a velocity)."""
        from library.models.sd3.text import joint_context

        context, pooled = joint_context(cond, denoiser.config.joint_attention_dim)
        return denoiser(hidden_states=noisy.to(dtype), encoder_hidden_states=context.to(dtype),
                        pooled_projections=pooled.to(dtype), timestep=timesteps.to(dtype)).sample

    def swappable_blocks(self, denoiser: torch.nn.Module, count: int) -> tuple[list[torch.nn.Module], list[int]]:
        """sd-scripts' ``--blocks_to_swap N`` on the MMDiT: the last ``N`` joint blocks (checked against the depth
        from the file header, at most ``depth - 2``)."""
        blocks = list(denoiser.transformer_blocks)
        return blocks, list(range(len(blocks) - count, len(blocks)))

    def set_attention(self, models: Any, xformers: bool) -> str:
        """diffusers' SD3 attention already runs on SDPA; the VAE gets SDPA too."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        models.vae.set_attn_processor(AttnProcessor2_0())
        return "sdpa"

    def owns_denoiser(self, denoiser: torch.nn.Module) -> bool:
        return type(denoiser).__name__ == "SD3Transformer2DModel"

    def lora_denoiser_name(self, denoiser: torch.nn.Module, module_path: str) -> str:
        return module_path.replace(".", "_")  # networks.lora_sd3 names the SAI modules itself

    # ---- the LoRA tools: the single file's tensors as stored (library/models/sd3/lora_checkpoint.py)
    def lora_family(self, args: argparse.Namespace, source: Path, keys: Collection[str] | None) -> ModelFamily:
        from library.models.sd3.lora_checkpoint import sd3_lora_family

        return sd3_lora_family(source, keys)

    def load_for_lora(self, args: argparse.Namespace, family: ModelFamily, *, dtype: torch.dtype) -> Any:
        from library.models.sd3.lora_checkpoint import read_sd3_for_lora

        return read_sd3_for_lora(args.pretrained_model_name_or_path, dtype)

