"""Stable Diffusion 1.x / 2.x: one UNet, one CLIP text encoder, DDPM with epsilon or v prediction."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import MappingProxyType
from typing import Any, Collection, Mapping

import torch

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


class SDSpec(FamilySpec):
    """SD1.x and SD2.x (told apart by ``--v2``, checked against the text encoder in the checkpoint)."""

    name = "sd"
    scripts = ("train_network.py", "train_db.py", "fine_tune.py")
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
                            clip_skip=args.clip_skip, v2=models.family.name == "sd2")

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
