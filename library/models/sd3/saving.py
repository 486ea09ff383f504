"""Whole SD3 models out: the SAI single file (``model.diffusion_model.*`` + ``first_stage_model.*``, and the text
encoders under ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`` when asked), or a diffusers
``StableDiffusion3Pipeline`` folder. Both are written atomically; this toolkit and diffusers read them back."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection

import torch
from safetensors.torch import save_file

from library.io_utils import atomic_save_file, atomic_save_folder, atomic_write_json
from library.models.sd3.conversion import SAI_PREFIX, TEXT_PREFIXES, VAE_PREFIX, diffusers_to_sai

TEXT_ROLES = ("clip_l", "clip_g", "t5xxl")
SINGLE_FILE_FORMATS = ("safetensors",)
FOLDER_FORMATS = ("diffusers", "diffusers_safetensors")


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in state.items()}


def _unwrap(module: Any) -> Any:
    return getattr(module, "module", module)


def sd3_single_file_state(models: Any, text_roles: Collection[str],
                          dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The single-file tensors: the MMDiT, the VAE (LDM names) and the text encoders in ``text_roles``."""
    from library.models.ldm_conversion import vae_diffusers_to_ldm

    state = _cast(diffusers_to_sai(_unwrap(models.unet).state_dict(), prefix=SAI_PREFIX), dtype)
    state.update(_cast({VAE_PREFIX + k: v for k, v in vae_diffusers_to_ldm(models.vae.state_dict()).items()}, dtype))
    for role, encoder in zip(TEXT_ROLES, models.text_encoders):
        if role in text_roles:
            weights = _unwrap(encoder).state_dict()
            if role == "t5xxl":
                weights = {k: v for k, v in weights.items() if k != "encoder.embed_tokens.weight"}  # tied to shared
            state.update(_cast({TEXT_PREFIXES[role] + k: v for k, v in weights.items()}, dtype))
    return state


def save_sd3_model(path: str | Path, models: Any, *, fmt: str, dtype: torch.dtype | None = None,
                   metadata: dict[str, str] | None = None, text_roles: Collection[str] = TEXT_ROLES) -> Path:
    """Save ``models`` as ``fmt``: ``safetensors`` (the single file with the text encoders in ``text_roles``) or
    ``diffusers`` / ``diffusers_safetensors`` (a whole pipeline folder)."""
    path = Path(path)
    if fmt in SINGLE_FILE_FORMATS:
        tensors = sd3_single_file_state(models, text_roles, dtype)
        atomic_save_file(path, lambda tmp: save_file(tensors, tmp, metadata=dict(metadata or {})))
        return path
    if fmt not in FOLDER_FORMATS:
        raise ValueError(f"unknown SD3 model format {fmt!r}; use safetensors, diffusers or diffusers_safetensors")
    atomic_save_folder(path, lambda tmp: _save_folder(tmp, models, dtype))
    return path


def _save_folder(folder: Path, models: Any, dtype: torch.dtype | None) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts = (("transformer", _unwrap(models.unet)), ("vae", models.vae),
             *zip(("text_encoder", "text_encoder_2", "text_encoder_3"), (_unwrap(t) for t in models.text_encoders)))
    for name, module in parts:
        original = next(module.parameters()).dtype
        module.to(dtype or original)
        try:
            module.save_pretrained(str(folder / name), safe_serialization=True)
        finally:
            module.to(original)
    for name, tokenizer in zip(("tokenizer", "tokenizer_2", "tokenizer_3"), models.tokenizers):
        tokenizer.save_pretrained(str(folder / name))
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(str(folder / "scheduler"))
    write_sd3_model_index(folder)


def write_sd3_model_index(folder: Path) -> None:
    """``model_index.json`` of a diffusers ``StableDiffusion3Pipeline`` folder."""
    atomic_write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusion3Pipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None], "feature_extractor": [None, None],
    })
