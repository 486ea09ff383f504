"""SDXL: a UNet with size/crop conditioning, two CLIP text encoders (ViT-L and OpenCLIP bigG), DDPM.

Conditioning, as SDXL was trained (and as sd-scripts feeds it): TE1's penultimate hidden states (layer 11
of 12) concatenated with TE2's penultimate ones, TE2's pooled output through its projection, and six ids
per sample — original size (h, w), crop top-left (top, left), target size (h, w) — from the dataset.
LoRA module names follow the original (SGM/LDM) UNet layout, as sd-scripts writes them.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Collection, Mapping

import torch

from library.errors import UserError
from library.models.families.base import (
    SDXL_LORA_BLOCKS, Conditioning, FamilySpec, LatentFlag, ModelFamily, objective_for,
)
from library.models.families.sd import SD_SCHEDULE

logger = logging.getLogger(__name__)

SDXL_LATENT_SCALE = 0.13025
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."


def sdxl_family(v_parameterization: bool = False) -> ModelFamily:
    """SDXL base 1.0 and its fine-tunes (``--v_parameterization`` for v-prediction ones)."""
    return ModelFamily(
        name="sdxl", objective=objective_for(v_parameterization), latent_scale=SDXL_LATENT_SCALE, bucket_step=32,
        default_resolution=1024, base_model_version="sdxl_base_v1-0",
        modelspec_architecture="stable-diffusion-xl-v1-base", spec_name="sdxl", scheduler_config=SD_SCHEDULE,
        cache_suffix="_sdxl", lora_blocks=SDXL_LORA_BLOCKS, vae_half_safe=False,
    )


BLOCK_LR_COUNT = 23


def block_lr_index(denoiser: torch.nn.Module, param_name: str) -> int:
    """sd-scripts' ``--block_lr`` slot of an SDXL UNet parameter: 0 time/label embeddings, 1-9 input blocks,
    10-12 the middle block's three parts, 13-21 output blocks, 22 the output layers."""
    from library.models.ldm_conversion import unet_module_to_ldm

    module = param_name.rpartition(".")[0]
    if module.startswith(("time_embedding", "add_embedding")):
        return 0
    if module.startswith(("conv_norm_out", "conv_out")):
        return BLOCK_LR_COUNT - 1
    parts = unet_module_to_ldm(module, denoiser.config).split(".")
    offset = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[parts[0]]
    return offset + int(parts[1])


def _checkpoint_problems(source: Path, keys: Collection[str]) -> list[str]:
    from library.models import ldm_conversion as conv

    parts = ((conv.UNET_PREFIX, "UNet"), (TE1_PREFIX, "text encoder 1 (CLIP ViT-L)"),
             (TE2_PREFIX, "text encoder 2 (OpenCLIP bigG)"))
    return [f"{source}: no {what} weights ({prefix}*) in this SDXL checkpoint; the file is incomplete or damaged"
            for prefix, what in parts if not any(k.startswith(prefix) for k in keys)]


class SDXLSpec(FamilySpec):
    """SDXL base/refiner-less layout: single files (``sd_xl_base_1.0.safetensors``) and diffusers folders."""

    name = "sdxl"
    scripts = ("sdxl_train_network.py", "sdxl_train.py")
    loads_stored_dtype = True
    lora_blocks = SDXL_LORA_BLOCKS
    lora_save_formats = ("safetensors", "ckpt", "diffusers_safetensors")
    latent_flag = LatentFlag("--sdxl", "SDXL", "a VAE given alone is SDXL's: name the latent files for SDXL "
                             "training (a whole SDXL checkpoint or folder is recognised without it)")

    def recognises_file(self, keys: Collection[str]) -> bool:
        return any(k.startswith("conditioner.embedders.") for k in keys)

    def latent_family(self, source: Path, args: argparse.Namespace, *, recognised: bool) -> ModelFamily:
        return sdxl_family()

    def load_tokenizers(self, family: ModelFamily, *, model_dir: Path | None, cache_dir: str | None) -> list[Any]:
        from library.models.tokenizers import SDXL_TOKENIZERS, load_clip_tokenizer

        return [load_clip_tokenizer(spec, model_dir=model_dir, cache_dir=cache_dir) for spec in SDXL_TOKENIZERS]

    def recognises_folder(self, folder: Path) -> bool:
        index, unet_config = folder / "model_index.json", folder / "unet" / "config.json"
        if index.is_file() and "StableDiffusionXL" in index.read_text(encoding="utf-8"):
            return True
        return unet_config.is_file() and '"text_time"' in unet_config.read_text(encoding="utf-8")

    def family(self, args: argparse.Namespace, source: Path, keys: Collection[str] | None) -> ModelFamily:
        if getattr(args, "v2", False):
            raise UserError("--v2 is for Stable Diffusion 2.x models; SDXL is recognised from the checkpoint: "
                            "remove --v2")
        problems = _checkpoint_problems(source, keys) if keys is not None else []
        if source.is_dir():
            problems += [f"{source}: no {sub}/ folder; an SDXL diffusers model has unet/, vae/, text_encoder/ "
                         "and text_encoder_2/" for sub in ("unet", "text_encoder", "text_encoder_2")
                         if not (source / sub).is_dir()]
        if problems:
            raise UserError(problems[0] if len(problems) == 1 else "; ".join(problems))
        return sdxl_family(bool(getattr(args, "v_parameterization", False)))

    def load(self, args: argparse.Namespace, family: ModelFamily, *, device: Any, dtype: torch.dtype) -> Any:
        from library.models.sdxl_loading import load_sdxl_models

        return load_sdxl_models(args, family, device=device, dtype=dtype)

    def save(self, path: Path, models: Any, *, fmt: str, dtype: torch.dtype | None, metadata: dict[str, str] | None,
             epoch: int, global_step: int) -> Path:
        from library.models.sdxl_saving import save_sdxl_model

        return save_sdxl_model(path, models, fmt=fmt, dtype=dtype, metadata=metadata, epoch=epoch,
                               global_step=global_step)

    def text_encoding(self, models: Any, args: argparse.Namespace) -> Any:
        from library.models.arguments import parse_max_token_length
        from library.models.sdxl_text import SDXLTextEncoding

        if getattr(args, "clip_skip", None) is not None:
            logger.warning("--clip_skip is ignored for SDXL: it is conditioned on the penultimate layers of both "
                           "text encoders, as it was trained (sd-scripts ignores it too)")
        return SDXLTextEncoding(models.tokenizers, models.text_encoders,
                                max_token_length=parse_max_token_length(args.max_token_length))

    def conditioning(self, text: Any, batch: Mapping[str, Any], device: torch.device) -> Conditioning:
        ids = torch.cat([batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]], dim=1)
        return {"encoder_hidden_states": text["encoder_hidden_states"], "text_embeds": text["text_embeds"],
                "time_ids": ids.to(device, torch.float32)}

    def forward(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning, dtype: torch.dtype) -> torch.Tensor:
        added = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}
        return denoiser(noisy.to(dtype), timesteps, cond["encoder_hidden_states"].to(dtype),
                        added_cond_kwargs=added).sample

    def owns_denoiser(self, denoiser: torch.nn.Module) -> bool:
        return getattr(getattr(denoiser, "config", None), "addition_embed_type", None) == "text_time"

    def lora_denoiser_name(self, denoiser: torch.nn.Module, module_path: str) -> str:
        from library.models.ldm_conversion import unet_module_to_ldm

        return unet_module_to_ldm(module_path, denoiser.config).replace(".", "_")
