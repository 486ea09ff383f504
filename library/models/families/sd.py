"""Stable Diffusion 1.x / 2.x: one UNet, one CLIP text encoder, DDPM with epsilon or v prediction."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import MappingProxyType
from typing import Any, Collection, Mapping

import torch

from dataclasses import dataclass

from library.models.families.base import Conditioning, FamilySpec, ModelFamily, objective_for

#: the DDPM training schedule of SD1.x, SD2.x and SDXL (diffusers ``DDPMScheduler`` arguments)
SD_SCHEDULE: Mapping[str, Any] = MappingProxyType(dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
))
SD_LATENT_SCALE = 0.18215


def sd_family(v2: bool = False, v_parameterization: bool = False) -> ModelFamily:
    """The SD1.x / SD2.x family for the ``--v2`` / ``--v_parameterization`` flags.

    ``--v_parameterization`` without ``--v2`` (v-prediction fine-tunes of SD1.x) keeps the SD1 numbers
    and changes the prediction type (and, as in sd-scripts, ``ss_base_model_version`` to ``sd_v1_v``).
    """
    objective = objective_for(v_parameterization)
    common = dict(objective=objective, latent_scale=SD_LATENT_SCALE, bucket_step=64, spec_name="sd",
                  scheduler_config=SD_SCHEDULE, cache_suffix="_sd")
    if not v2:
        return ModelFamily(name="sd1", default_resolution=512, modelspec_architecture="stable-diffusion-v1",
                           base_model_version="sd_v1_v" if v_parameterization else "sd_v1", **common)
    return ModelFamily(
        name="sd2", default_resolution=768 if v_parameterization else 512, ss_v2=True,
        base_model_version="sd_v2_v" if v_parameterization else "sd_v2",
        modelspec_architecture="stable-diffusion-v2-768-v" if v_parameterization else "stable-diffusion-v2-512",
        **common,
    )


@dataclass(frozen=True)
class SDVariant:
    """What tells SD2.x from SD1.x beyond the numbers of :func:`sd_family` (the loaders, the single-file
    layout, the tokenizers and the architecture reader ask this, never the family's name)."""

    openclip: bool  # OpenCLIP ViT-H text encoder (``cond_stage_model.model.*``), SD2 tokenizer padding with id 0
    hidden_act: str  # of the text encoder
    pad_token_id: int
    per_level_heads: bool  # UNet attention heads per level (width // 64) instead of 8 everywhere
    upcast_attention: bool  # the 768-v models upcast attention to float32


def sd_variant(family: ModelFamily) -> SDVariant:
    """The SD1.x / SD2.x facts of ``family`` (any non-SD2 family reads as SD1.x, as CLIP ViT-L users)."""
    v2 = family.name == "sd2"
    return SDVariant(openclip=v2, hidden_act="gelu" if v2 else "quick_gelu", pad_token_id=0 if v2 else 49407,
                     per_level_heads=v2, upcast_attention=v2 and family.objective.is_v_prediction)


class SDSpec(FamilySpec):
    """SD1.x and SD2.x (told apart by ``--v2``, checked against the text encoder in the checkpoint)."""

    name = "sd"
    scripts = ("train_network.py", "train_db.py", "fine_tune.py")
    loads_stored_dtype = True
    lora_save_formats = ("safetensors", "ckpt", "diffusers_safetensors")

    def recognises_file(self, keys: Collection[str]) -> bool:
        from library.models import ldm_conversion as conv

        return any(k.startswith((conv.CLIP_PREFIX, conv.OPENCLIP_PREFIX)) for k in keys)

    def recognises_folder(self, folder: Path) -> bool:
        return (folder / "text_encoder").is_dir() and not (folder / "text_encoder_2").is_dir()

    def family(self, args: argparse.Namespace, source: Path, keys: Collection[str] | None) -> ModelFamily:
        from library.models.loading import check_sd_family

        family = sd_family(bool(getattr(args, "v2", False)), bool(getattr(args, "v_parameterization", False)))
        check_sd_family(family, source, keys)
        return family

    def latent_family(self, source: Path, args: argparse.Namespace, *, recognised: bool) -> ModelFamily:
        """SD1.x/2.x is the family of a 4-channel VAE given without a family flag (``--v2`` as given)."""
        return sd_family(bool(getattr(args, "v2", False)), False)

    def load_tokenizers(self, family: ModelFamily, *, model_dir: Path | None, cache_dir: str | None) -> list[Any]:
        from library.models.tokenizers import load_tokenizer

        return [load_tokenizer(family, model_dir=model_dir, cache_dir=cache_dir)]

    def load(self, args: argparse.Namespace, family: ModelFamily, *, device: Any, dtype: torch.dtype) -> Any:
        from library.models.loading import load_sd_models

        return load_sd_models(args, device=device, dtype=dtype, family=family)

    def save(self, path: Path, models: Any, *, fmt: str, dtype: torch.dtype | None, metadata: dict[str, str] | None,
             epoch: int, global_step: int) -> Path:
        from library.models.saving import save_sd_model

        return save_sd_model(path, models, fmt=fmt, dtype=dtype, unet=models.unet, text_encoder=models.text_encoders[0],
                             metadata=metadata, epoch=epoch, global_step=global_step)

    def text_encoding(self, models: Any, args: argparse.Namespace) -> Any:
        from library.models.arguments import parse_max_token_length
        from library.models.text_encoding import TextEncoding

        return TextEncoding(models.tokenizers[0], models.text_encoders[0],
                            max_token_length=parse_max_token_length(args.max_token_length),
                            clip_skip=args.clip_skip, v2=sd_variant(models.family).openclip)

    def conditioning(self, text: Any, batch: Mapping[str, Any], device: torch.device) -> Conditioning:
        return {"encoder_hidden_states": text}

    def forward(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning, dtype: torch.dtype) -> torch.Tensor:
        return denoiser(noisy.to(dtype), timesteps, cond["encoder_hidden_states"].to(dtype)).sample

    def owns_denoiser(self, denoiser: torch.nn.Module) -> bool:
        config = getattr(denoiser, "config", None)
        return getattr(config, "addition_embed_type", None) is None

    def lora_denoiser_name(self, denoiser: torch.nn.Module, module_path: str) -> str:
        return module_path.replace(".", "_")
