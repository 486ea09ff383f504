"""Tiny random-weight Stable Diffusion models for the demo, tests and benchmarks.

They have the SD1.x / SD2.x structure (same module names and block types) at a size that trains in
seconds on a CPU. The tokenizer is the real CLIP BPE, built from the vocabulary bundled in
``library/models/assets`` (it ships in the MIT-licensed open-clip-torch package).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ASSETS = Path(__file__).parent / "assets"
BPE_VOCAB = ASSETS / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer(folder: str | Path, sd2: bool = False) -> Path:
    """Write the CLIP ViT-L/14 tokenizer files (``vocab.json``, ``merges.txt`` and configs) to ``folder``.

    ``sd2=True`` writes the SD2 (OpenCLIP) variant, which pads with ``!`` (id 0) instead of ``<|endoftext|>``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(BPE_VOCAB, "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_json = json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False)
    (folder / "vocab.json").write_text(vocab_json, encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "!" if sd2 else "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return folder


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of a tiny SD-shaped model. ``sd2`` switches to the SD2 layout (linear projection, gelu, pad 0)."""

    sd2: bool = False
    block_out_channels: tuple[int, ...] = (32, 32, 64, 64)
    cross_attention_dim: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 64
    vae_channels: int = 32
    layers_per_block: int = 1

    def unet_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            norm_num_groups=32,
            cross_attention_dim=self.cross_attention_dim,
            attention_head_dim=8,
        )
        if self.sd2:
            cfg.update(use_linear_projection=True, attention_head_dim=(2, 4, 8, 8))
        return cfg

    def vae_config(self) -> dict[str, Any]:
        c = self.vae_channels
        return dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(c, c, c, c),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=64,
            scaling_factor=0.18215,
        )

    def text_config(self) -> dict[str, Any]:
        return dict(
            vocab_size=49408,
            hidden_size=self.cross_attention_dim,
            intermediate_size=self.text_intermediate,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            max_position_embeddings=77,
            hidden_act="gelu" if self.sd2 else "quick_gelu",
            projection_dim=self.cross_attention_dim,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0 if self.sd2 else 49407,
        )


def build_tiny_components(config: TinyConfig = TinyConfig(), seed: int = 0) -> dict[str, Any]:
    """Random-weight ``unet``, ``vae``, ``text_encoder`` and ``scheduler`` with the given sizes."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.families import SD_SCHEDULE

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config.unet_config())
    vae = AutoencoderKL(**config.vae_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**config.text_config()))
    scheduler = DDPMScheduler(
        **SD_SCHEDULE,
        clip_sample=False,
        prediction_type="epsilon",
        steps_offset=1,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


def save_tiny_diffusers_model(folder: str | Path, config: TinyConfig = TinyConfig(), seed: int = 0) -> Path:
    """Save a tiny model as a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
    ``scheduler/``, ``model_index.json``) that ``StableDiffusionPipeline.from_pretrained`` can read."""
    folder = Path(folder)
    parts = build_tiny_components(config, seed)
    for name in ("unet", "vae", "text_encoder"):
        parts[name].save_pretrained(folder / name, safe_serialization=True)
    parts["scheduler"].save_pretrained(folder / "scheduler")
    write_clip_tokenizer(folder / "tokenizer", sd2=config.sd2)
    from library.models.saving import write_model_index

    write_model_index(folder)
    return folder
