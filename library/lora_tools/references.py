"""Full-size models of each family on the ``meta`` device (names and shapes, no memory), and the diffusers
pipelines around them, for ``check_lora_weights.py``'s loader checks and the benchmarks. Each family's
:data:`library.lora_tools.targets.LORA_FAMILIES` row names its builders here."""

from __future__ import annotations

from typing import Any

from torch import nn

SD_REFERENCE_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd1": {
        "unet": dict(cross_attention_dim=768, attention_head_dim=8),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     projection_dim=768, hidden_act="quick_gelu"),
    },
    "sd2": {
        "unet": dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
        "text": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                     projection_dim=1024, hidden_act="gelu"),
    },
}


def sd_reference(family_name: str) -> tuple[list[nn.Module], nn.Module]:
    """SD1.5 (``sd1``) or SD2.1 (``sd2``): ``([text encoder], unet)`` on ``meta``."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = SD_REFERENCE_CONFIGS[family_name]
    with init_empty_weights():
        unet = UNet2DConditionModel(**config["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**config["text"]))
    return [text_encoder], unet


def sdxl_reference(family_name: str = "sdxl") -> tuple[list[nn.Module], nn.Module]:
    """SDXL base 1.0: ``([CLIP ViT-L, OpenCLIP bigG with projection], unet)`` on ``meta``."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.tiny_sdxl import sdxl_base_text_configs, sdxl_base_unet_config

    c1, c2 = sdxl_base_text_configs()
    with init_empty_weights():
        unet = UNet2DConditionModel(**sdxl_base_unet_config())
        tes = [CLIPTextModel(CLIPTextConfig(**c1)), CLIPTextModelWithProjection(CLIPTextConfig(**c2))]
    return tes, unet


def flux_reference(family_name: str = "flux") -> tuple[list[nn.Module], nn.Module]:
    """FLUX.1-dev: ``([CLIP-L, T5-XXL encoder], transformer)`` on ``meta`` (a schnell LoRA fits it too: it only
    lacks the guidance embedder)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        transformer = FluxTransformer2DModel(guidance_embeds=True)
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"))
        t5 = _t5_xxl()
    return [clip, t5], transformer


def sd3_reference(family_name: str = "sd3") -> tuple[list[nn.Module], nn.Module]:
    """SD3 Medium: ``([CLIP-L, CLIP-G, T5-XXL encoder], MMDiT)`` on ``meta`` (the LoRA's own variant is not known
    here; an SD3.5 file shows up as modules that match nothing)."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from library.models.sd3.tiny import full_size_architecture, full_size_text_configs

    clip_l, clip_g = full_size_text_configs()
    with init_empty_weights():
        transformer = SD3Transformer2DModel(**full_size_architecture("medium").diffusers_config())
        tes = [CLIPTextModelWithProjection(clip_l), CLIPTextModelWithProjection(clip_g), _t5_xxl()]
    return tes, transformer


def lumina_reference(family_name: str = "lumina") -> tuple[list[nn.Module], nn.Module]:
    """Lumina Image 2.0 (2B): ``([Gemma2 2B], Next-DiT)`` on ``meta`` (diffusers' and transformers' defaults are
    these sizes)."""
    from accelerate import init_empty_weights
    from diffusers import Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    with init_empty_weights():
        return [Gemma2Model(Gemma2Config())], Lumina2Transformer2DModel()


def _t5_xxl() -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu", is_encoder_decoder=False))


def sd_pipeline(text_encoders: list[nn.Module], unet: nn.Module) -> Any:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=None, text_encoder=text_encoders[0], tokenizer=None, unet=unet, scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sdxl_pipeline(text_encoders: list[nn.Module], unet: nn.Module) -> Any:
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(vae=None, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                     tokenizer=None, tokenizer_2=None, unet=unet, scheduler=None)


def flux_pipeline(text_encoders: list[nn.Module], transformer: nn.Module) -> Any:
    from diffusers import FluxPipeline

    return FluxPipeline(scheduler=None, vae=None, text_encoder=text_encoders[0], tokenizer=None,
                        text_encoder_2=text_encoders[1], tokenizer_2=None, transformer=transformer)


def sd3_pipeline(text_encoders: list[nn.Module], transformer: nn.Module) -> Any:
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        scheduler=None, vae=None, text_encoder=text_encoders[0], tokenizer=None, text_encoder_2=text_encoders[1],
        tokenizer_2=None, text_encoder_3=text_encoders[2], tokenizer_3=None, transformer=transformer,
    )


def lumina_pipeline(text_encoders: list[nn.Module], transformer: nn.Module) -> Any:
    from diffusers import Lumina2Pipeline

    return Lumina2Pipeline(scheduler=None, vae=None, text_encoder=text_encoders[0], tokenizer=None,
                           transformer=transformer)
