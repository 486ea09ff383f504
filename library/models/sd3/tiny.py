"""Tiny random-weight SD3 / SD3.5 models for tests, demos and benchmarks.

The MMDiT is diffusers' ``SD3Transformer2DModel`` in the shape of each variant: ``medium`` (no qk-norm, SAI's
head size 64: 2 blocks, 2 heads), ``5-medium`` (qk-norm and a dual-attention layer) and ``5-large`` (qk-norm
only), with a 16-channel VAE (SD3's scale and shift), CLIP-L and CLIP-G with the bundled CLIP BPE
(``CLIPTextModelWithProjection``) and a T5 with a synthetic T5-style tokenizer. CLIP-L + CLIP-G widths fit
inside the T5 width, as 768 + 1280 fit inside 4096. Saved as the single file (with or without the text
encoders and VAE inside, the parts then written beside it) or as a diffusers ``StableDiffusion3Pipeline`` folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from library.models.architecture import _heads
from library.models.sd3.conversion import SAI_PREFIX, TEXT_PREFIXES, VAE_PREFIX, SD3Architecture, diffusers_to_sai

SD3_LATENT_SCALE = 1.5305
SD3_LATENT_SHIFT = 0.0609


@dataclass(frozen=True)
class TinySD3Config:
    """Sizes of a tiny SD3 of ``variant`` ``medium``, ``5-medium`` or ``5-large``."""

    variant: str = "5-medium"
    depth: int = 2
    clip_l_width: int = 16
    clip_g_width: int = 24
    t5_width: int = 48
    vae_channels: int = 32
    heads: int | None = None  # default: one 64-wide head per block (medium), else 4 heads of 8
    head_dim: int | None = None

    def architecture(self) -> SD3Architecture:
        qk_norm = self.variant != "medium"
        head_dim, heads = (64, self.depth) if not qk_norm else (8, 4)  # SAI's medium: 64-wide heads, one per block
        head_dim, heads = self.head_dim or head_dim, self.heads or heads
        return SD3Architecture(
            hidden_size=head_dim * heads, depth=self.depth, patch_size=2, in_channels=16, out_channels=16,
            head_dim=head_dim, context_in_dim=self.t5_width, pooled_in_dim=self.clip_l_width + self.clip_g_width,
            pos_embed_max_size=32, qk_norm=qk_norm, dual_attention_layers=(0,) if self.variant == "5-medium" else (),
        )

    def vae_config(self) -> dict[str, Any]:
        c = self.vae_channels
        return dict(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(c, c, c, c), layers_per_block=1,
            latent_channels=16, norm_num_groups=32, sample_size=64, scaling_factor=SD3_LATENT_SCALE,
            shift_factor=SD3_LATENT_SHIFT, use_quant_conv=False, use_post_quant_conv=False,
        )

    def clip_config(self, width: int, big: bool):
        from transformers import CLIPTextConfig

        return CLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=_heads(width), max_position_embeddings=77,
            hidden_act="gelu" if big else "quick_gelu", projection_dim=width, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=0 if big else 49407,
        )

    def t5_config(self, vocab_size: int):
        from transformers import T5Config

        return T5Config(vocab_size=vocab_size, d_model=self.t5_width, d_kv=8, d_ff=2 * self.t5_width, num_layers=2,
                        num_heads=4, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)


def build_tiny_sd3(config: TinySD3Config = TinySD3Config(), seed: int = 0, t5_vocab: int = 256) -> dict[str, Any]:
    """Random-weight ``transformer``, ``vae``, ``clip_l``, ``clip_g`` and ``t5`` modules (float32)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**config.architecture().diffusers_config())
    with torch.no_grad():  # diffusers zero-initialises some layers; random values let conversion tests fail
        for p in transformer.parameters():
            if not p.abs().any():
                p.normal_(0.0, 0.02)
    return {
        "transformer": transformer, "vae": AutoencoderKL(**config.vae_config()),
        "clip_l": CLIPTextModelWithProjection(config.clip_config(config.clip_l_width, big=False)),
        "clip_g": CLIPTextModelWithProjection(config.clip_config(config.clip_g_width, big=True)),
        "t5": T5EncoderModel(config.t5_config(t5_vocab)),
    }


def _contiguous(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().contiguous() for k, v in state.items()}


def _t5_state(t5: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared


def save_tiny_sd3_files(folder: str | Path, config: TinySD3Config = TinySD3Config(), seed: int = 0, *,
                        bundled: bool = True) -> dict[str, Path]:
    """Write ``sd3.safetensors`` (SAI layout; ``bundled``: with the text encoders and VAE inside, as
    ``sd3_medium_incl_clips_t5xxlfp16.safetensors``), the parts as ``clip_l``/``clip_g``/``t5xxl``/``vae``
    ``.safetensors``, and a ``tokenizers/`` folder for ``--tokenizer_cache_dir``; returns the paths by role."""
    from library.models.ldm_conversion import vae_diffusers_to_ldm
    from library.models.t5 import T5_TOKENIZER_ID, write_test_t5_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = build_tiny_sd3(config, seed)
    states = {"clip_l": _contiguous(parts["clip_l"].state_dict()), "clip_g": _contiguous(parts["clip_g"].state_dict()),
              "t5xxl": _contiguous(_t5_state(parts["t5"])),
              "vae": _contiguous(vae_diffusers_to_ldm(parts["vae"].state_dict()))}
    mmdit = _contiguous(diffusers_to_sai(parts["transformer"].state_dict(), config.architecture(), prefix=SAI_PREFIX))
    paths = {"sd3": folder / "sd3.safetensors"}
    single = dict(mmdit)
    for role, state in states.items():
        paths[role] = folder / f"{role}.safetensors"
        save_file(state, str(paths[role]))
        if bundled:
            prefix = VAE_PREFIX if role == "vae" else TEXT_PREFIXES[role]
            single.update(_contiguous(state, prefix))
    save_file(single, str(paths["sd3"]))
    paths["tokenizer_cache_dir"] = folder / "tokenizers"
    write_test_t5_tokenizer(paths["tokenizer_cache_dir"] / T5_TOKENIZER_ID.replace("/", "_"))
    return paths


def save_tiny_sd3_diffusers(folder: str | Path, config: TinySD3Config = TinySD3Config(), seed: int = 0) -> Path:
    """The same tiny model as a diffusers ``StableDiffusion3Pipeline`` folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from library.models.sd3.saving import write_sd3_model_index
    from library.models.t5 import write_test_t5_tokenizer
    from library.models.tiny import write_clip_tokenizer

    folder = Path(folder)
    parts = build_tiny_sd3(config, seed)
    for name, sub in (("transformer", "transformer"), ("vae", "vae"), ("clip_l", "text_encoder"),
                      ("clip_g", "text_encoder_2"), ("t5", "text_encoder_3")):
        parts[name].save_pretrained(folder / sub, safe_serialization=True)
    write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2", sd2=True)
    write_test_t5_tokenizer(folder / "tokenizer_3")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    write_sd3_model_index(folder)
    return folder


def full_size_architecture(variant: str) -> SD3Architecture:
    """The released models' MMDiT sizes (for ``meta``-device checks and benchmarks): SD3 Medium and SD3.5
    Medium have 24 blocks (SD3.5 Medium with dual attention in blocks 0-12), SD3.5 Large 38; 64-wide heads."""
    depth = 38 if variant == "5-large" else 24
    return SD3Architecture(
        hidden_size=64 * depth, depth=depth, patch_size=2, in_channels=16, out_channels=16, head_dim=64,
        context_in_dim=4096, pooled_in_dim=2048, pos_embed_max_size=384 if variant == "5-medium" else 192,
        qk_norm=variant != "medium", dual_attention_layers=tuple(range(13)) if variant == "5-medium" else (),
    )


def full_size_text_configs() -> tuple[Any, Any]:
    """CLIP-L and CLIP-G (OpenCLIP bigG) ``CLIPTextConfig``s of the released SD3 models."""
    from transformers import CLIPTextConfig

    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            projection_dim=768, hidden_act="quick_gelu")
    clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            projection_dim=1280, hidden_act="gelu")
    return clip_l, clip_g
