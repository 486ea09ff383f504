"""Loading SDXL: diffusers folders (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``) and single
files in the ``sd_xl_base_1.0.safetensors`` layout (see ``sdxl_single_file.py``). Weights load strictly, as
for SD1.x/2.x; the tokenizers are found offline (``tokenizers.load_clip_tokenizer``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.models.families import ModelFamily
from library.models.loading import (
    _DIFFUSERS_WEIGHTS,
    _TRANSFORMERS_WEIGHTS,
    SDModels,
    _adapt_text_keys,
    _build_unet,
    _build_vae,
    _read_json,
    load_vae,
    resolve_model_path,
)
from library.models.tokenizers import SDXL_TOKENIZERS, load_clip_tokenizer
from library.models.weights import build_with_weights, find_weights_file, read_weight_files


def build_sdxl_text_encoders(config1, config2, sd1: dict, sd2: dict, what: str, dtype, device) -> list:
    """TE1 (``CLIPTextModel``) and TE2 (``CLIPTextModelWithProjection``) from transformers-named weights."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    te1 = build_with_weights(lambda: CLIPTextModel(config1), sd1, f"{what} (text encoder 1)", dtype=dtype,
                             device=device, adapt=_adapt_text_keys)
    te2 = build_with_weights(lambda: CLIPTextModelWithProjection(config2), sd2, f"{what} (text encoder 2)",
                             dtype=dtype, device=device, adapt=_adapt_te2_keys)
    return [te1, te2]


def _adapt_te2_keys(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    projection = {k: v for k, v in sd.items() if k.startswith("text_projection.")}
    rest = _adapt_text_keys({k: v for k, v in sd.items() if k not in projection}, expected)
    return {**rest, **projection}


def _load_folder(folder: Path, dtype, device, with_vae: bool) -> tuple[Any, Any, list]:
    from transformers import CLIPTextConfig

    unet_dir = folder / "unet"
    unet = _build_unet(_read_json(unet_dir / "config.json"),
                       read_weight_files(find_weights_file(unet_dir, _DIFFUSERS_WEIGHTS)), str(unet_dir), dtype, device)
    vae = None
    if with_vae:
        vae_dir = folder / "vae"
        vae = _build_vae(_read_json(vae_dir / "config.json"),
                         read_weight_files(find_weights_file(vae_dir, _DIFFUSERS_WEIGHTS)), str(vae_dir), dtype, device)
    configs, weights = [], []
    for sub in ("text_encoder", "text_encoder_2"):
        configs.append(CLIPTextConfig.from_dict(_read_json(folder / sub / "config.json")))
        weights.append(read_weight_files(find_weights_file(folder / sub, _TRANSFORMERS_WEIGHTS)))
    return unet, vae, build_sdxl_text_encoders(*configs, *weights, str(folder), dtype, device)


def load_sdxl_models(args, family: ModelFamily, *, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> SDModels:
    """The SDXL model of ``args.pretrained_model_name_or_path`` (``--vae`` replaces its VAE)."""
    from library.models.sdxl_single_file import load_sdxl_single_file

    source = resolve_model_path(getattr(args, "pretrained_model_name_or_path", None))
    vae_name = getattr(args, "vae", None)
    if vae_name and not Path(vae_name).expanduser().exists():
        raise UserError(f"--vae {vae_name}: file or folder not found")
    model_dir = source if source.is_dir() else None
    cache_dir = getattr(args, "tokenizer_cache_dir", None)
    tokenizers = [load_clip_tokenizer(spec, model_dir=model_dir, cache_dir=cache_dir) for spec in SDXL_TOKENIZERS]
    if source.is_dir():
        unet, vae, text_encoders = _load_folder(source, dtype, device, with_vae=not vae_name)
    else:
        unet, vae, text_encoders = load_sdxl_single_file(source, family, dtype, device, with_vae=not vae_name)
    if vae_name:
        vae = load_vae(vae_name, family, dtype=dtype, device=device)
    return SDModels(family=family, unet=unet, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                    source=str(source), vae_source=str(Path(vae_name).expanduser()) if vae_name else None)
