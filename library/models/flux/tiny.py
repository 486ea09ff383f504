"""Tiny random-weight FLUX.1 models for tests, demos and benchmarks.

Same module names and block types as FLUX.1 (2 double + 2 single blocks by default), a 16-channel AE
with FLUX's latent scale and shift, a tiny CLIP-L with the real (bundled) CLIP BPE and a tiny T5 with a
synthetic T5-style tokenizer. Saved as the files people download (``flux.safetensors`` in the BFL layout,
``clip_l.safetensors``, ``t5xxl.safetensors``, ``ae.safetensors`` with LDM VAE names) or as a diffusers
``FluxPipeline`` folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from library.io_utils import atomic_write_json
from library.models.flux.conversion import FluxArchitecture, diffusers_to_bfl

FLUX_LATENT_SCALE = 0.3611
FLUX_LATENT_SHIFT = 0.1159


@dataclass(frozen=True)
class TinyFluxConfig:
    """Sizes of a tiny FLUX.1. ``guidance=True`` is dev-like (guidance embedding), False schnell-like."""

    guidance: bool = True
    depth: int = 2
    depth_single: int = 2
    heads: int = 2
    head_dim: int = 32  # axes (4, 14, 14): every rotary axis even
    clip_width: int = 32
    t5_width: int = 32
    ae_channels: int = 32

    def architecture(self) -> FluxArchitecture:
        hidden = self.heads * self.head_dim
        return FluxArchitecture(
            hidden_size=hidden, num_heads=self.heads, depth=self.depth, depth_single=self.depth_single,
            in_channels=64, out_channels=64, context_in_dim=self.t5_width, vec_in_dim=self.clip_width,
            mlp_hidden=4 * hidden, guidance_embed=self.guidance,
        )

    def ae_config(self) -> dict[str, Any]:
        c = self.ae_channels
        return dict(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(c, c, c, c), layers_per_block=1,
            latent_channels=16, norm_num_groups=32, sample_size=64, scaling_factor=FLUX_LATENT_SCALE,
            shift_factor=FLUX_LATENT_SHIFT, use_quant_conv=False, use_post_quant_conv=False,
        )

    def clip_config(self):
        from transformers import CLIPTextConfig

        return CLIPTextConfig(
            vocab_size=49408, hidden_size=self.clip_width, intermediate_size=2 * self.clip_width,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=self.clip_width, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )

    def t5_config(self, vocab_size: int):
        from transformers import T5Config

        return T5Config(
            vocab_size=vocab_size, d_model=self.t5_width, d_kv=8, d_ff=2 * self.t5_width, num_layers=2,
            num_heads=4, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        )


def build_tiny_flux(config: TinyFluxConfig = TinyFluxConfig(), seed: int = 0, t5_vocab: int = 256) -> dict[str, Any]:
    """Random-weight ``transformer``, ``ae``, ``clip_l`` and ``t5`` modules (float32)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**config.architecture().diffusers_config())
    # diffusers zero-initialises some layers; random values make conversion and LoRA tests able to fail
    with torch.no_grad():
        for p in transformer.parameters():
            if not p.abs().any():
                p.normal_(0.0, 0.02)
    ae = AutoencoderKL(**config.ae_config())
    clip_l = CLIPTextModel(config.clip_config())
    t5 = T5EncoderModel(config.t5_config(t5_vocab))
    return {"transformer": transformer, "ae": ae, "clip_l": clip_l, "t5": t5}


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_tiny_flux_files(folder: str | Path, config: TinyFluxConfig = TinyFluxConfig(), seed: int = 0) -> dict[str, Path]:
    """Write ``flux.safetensors`` (BFL), ``clip_l.safetensors``, ``t5xxl.safetensors``, ``ae.safetensors`` and a
    ``tokenizers/`` folder to pass as ``--tokenizer_cache_dir``; returns the paths by role."""
    from library.models.ldm_conversion import vae_diffusers_to_ldm
    from library.models.t5 import T5_TOKENIZER_ID, write_test_t5_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = build_tiny_flux(config, seed)
    paths = {name: folder / f"{name}.safetensors" for name in ("flux", "clip_l", "t5xxl", "ae")}
    arch = config.architecture()
    save_file(_contiguous(diffusers_to_bfl(parts["transformer"].state_dict(), arch)), str(paths["flux"]))
    clip_state = {"text_model." + k: v for k, v in parts["clip_l"].state_dict().items()}  # clip_l.safetensors names
    save_file(_contiguous(clip_state), str(paths["clip_l"]))
    t5_state = {k: v for k, v in parts["t5"].state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied
    save_file(_contiguous(t5_state), str(paths["t5xxl"]))
    save_file(_contiguous(vae_diffusers_to_ldm(parts["ae"].state_dict())), str(paths["ae"]))
    paths["tokenizer_cache_dir"] = folder / "tokenizers"
    write_test_t5_tokenizer(paths["tokenizer_cache_dir"] / T5_TOKENIZER_ID.replace("/", "_"))
    return paths


def save_tiny_flux_diffusers(folder: str | Path, config: TinyFluxConfig = TinyFluxConfig(), seed: int = 0) -> Path:
    """Save the same tiny model as a diffusers ``FluxPipeline`` folder (``FluxPipeline.from_pretrained`` reads it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from library.models.t5 import write_test_t5_tokenizer
    from library.models.tiny import write_clip_tokenizer

    folder = Path(folder)
    parts = build_tiny_flux(config, seed)
    parts["transformer"].save_pretrained(folder / "transformer", safe_serialization=True)
    parts["ae"].save_pretrained(folder / "vae", safe_serialization=True)
    parts["clip_l"].save_pretrained(folder / "text_encoder", safe_serialization=True)
    parts["t5"].save_pretrained(folder / "text_encoder_2", safe_serialization=True)
    write_clip_tokenizer(folder / "tokenizer")
    write_test_t5_tokenizer(folder / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                    base_image_seq_len=256, max_image_seq_len=4096).save_pretrained(folder / "scheduler")
    write_flux_model_index(folder)
    return folder


def write_flux_model_index(folder: Path) -> None:
    """``model_index.json`` of a diffusers ``FluxPipeline`` folder."""
    index = {
        "_class_name": "FluxPipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    atomic_write_json(folder / "model_index.json", index)
