"""Tiny random-weight SDXL models (same structure as SDXL: ``text_time`` UNet, CLIP ViT-L-style and
OpenCLIP-style encoders with projection, VAE) for tests and benchmarks, in both on-disk formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from library.models.tiny import TinyConfig, write_clip_tokenizer

SDXL_VAE_SCALE = 0.13025


def sdxl_base_unet_config() -> dict[str, Any]:
    """The real SDXL base 1.0 UNet (for architecture checks on the ``meta`` device and the real-size bench)."""
    return dict(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=2048, norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def sdxl_base_text_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    """The real SDXL text encoders: CLIP ViT-L/14 (12 layers) and OpenCLIP ViT-bigG/14 (32 layers)."""
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    return (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768, pad_token_id=49407, **common),
            dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280, pad_token_id=0, **common))


def tiny_sdxl_unet_config(context: int = 80, pooled: int = 32, time_dim: int = 8) -> dict[str, Any]:
    return dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        cross_attention_dim=context, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=pooled + 6 * time_dim,
    )


def _text_config(open_clip: bool) -> dict[str, Any]:
    # the two widths differ, as in SDXL (768 / 1280): diffusers' from_single_file tells the encoders apart by it
    width = 48 if open_clip else 32
    return dict(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                num_attention_heads=4,
                max_position_embeddings=77, hidden_act="gelu" if open_clip else "quick_gelu", projection_dim=32,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if open_clip else 49407)


def build_tiny_sdxl_components(seed: int = 0) -> dict[str, Any]:
    """Random-weight ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2`` and ``scheduler``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.families import SD_SCHEDULE

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
    vae = AutoencoderKL(**{**TinyConfig().vae_config(), "scaling_factor": SDXL_VAE_SCALE})
    te1 = CLIPTextModel(CLIPTextConfig(**_text_config(False)))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_text_config(True)))
    scheduler = DDPMScheduler(**SD_SCHEDULE, clip_sample=False, prediction_type="epsilon", steps_offset=1)
    return {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2, "scheduler": scheduler}


def write_sdxl_model_index(folder: Path) -> None:
    """``model_index.json`` of an SDXL diffusers folder, so ``StableDiffusionXLPipeline.from_pretrained`` reads it."""
    index = {
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def save_tiny_sdxl_diffusers_model(folder: str | Path, seed: int = 0) -> Path:
    """A tiny SDXL as a diffusers folder with both tokenizers."""
    folder = Path(folder)
    parts = build_tiny_sdxl_components(seed)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        parts[name].save_pretrained(folder / name, safe_serialization=True)
    parts["scheduler"].save_pretrained(folder / "scheduler")
    write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2", sd2=True)
    write_sdxl_model_index(folder)
    return folder


def save_tiny_sdxl_single_file(path: str | Path, seed: int = 0, dtype: torch.dtype | None = None) -> Path:
    """A tiny SDXL as one ``sd_xl_base_1.0``-layout safetensors file."""
    from safetensors.torch import save_file

    from library.models.architecture import ARCHITECTURE_METADATA_KEY
    from library.models.sdxl_single_file import sdxl_architecture_metadata, sdxl_ldm_state_dict

    path = Path(path)
    p = build_tiny_sdxl_components(seed)
    tes = [p["text_encoder"], p["text_encoder_2"]]
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in sdxl_ldm_state_dict(p["unet"], p["vae"], tes).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={ARCHITECTURE_METADATA_KEY: sdxl_architecture_metadata(p["unet"], p["vae"], tes)})
    return path


def save_sdxl_base_random_single_file(path: str | Path) -> Path:
    """The real-size SDXL base 1.0 architecture with random weights, as one float16 file in the
    ``sd_xl_base_1.0`` layout (about 7 GB; built directly in float16 to keep memory near that)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.architecture import ARCHITECTURE_METADATA_KEY
    from library.models.sdxl_single_file import sdxl_architecture_metadata, sdxl_ldm_state_dict

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        unet = UNet2DConditionModel(**sdxl_base_unet_config())
        c1, c2 = sdxl_base_text_configs()
        tes = [CLIPTextModel(CLIPTextConfig(**c1)), CLIPTextModelWithProjection(CLIPTextConfig(**c2))]
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=1024, scaling_factor=SDXL_VAE_SCALE)
    finally:
        torch.set_default_dtype(previous)
    tensors = {k: v.contiguous() for k, v in sdxl_ldm_state_dict(unet, vae, tes).items()}
    meta = {ARCHITECTURE_METADATA_KEY: sdxl_architecture_metadata(unet, vae, tes)}
    del unet, tes, vae
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path
