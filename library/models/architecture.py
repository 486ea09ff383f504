"""Model configs inferred from tensor shapes, for single-file checkpoints (no config download).

Widths, depths, layer counts, context width and projection type are read from the shapes. Attention head
counts and GroupNorm group counts have no trace in the weights; they come from the ``sd_architecture``
metadata that our saver writes, or else from these rules:

- UNet heads: SD1 8 per level (as SD1.x); SD2 ``width // 64`` (head dim 64, as SD2.x), or
  ``width // 8`` where the width is not a multiple of 64 (tiny models).
- Text encoder heads: ``width // 64`` (12 for SD1's 768, 16 for SD2's 1024), or ``width // 8`` where the
  width is not a multiple of 64.
- GroupNorm: 32 groups. SD2 768-v models use ``upcast_attention`` (as SD 2.1-v; no effect on weights).
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from library.errors import UserError
from library.models.families import ModelFamily
from library.models.families.sd import sd_variant

ARCHITECTURE_METADATA_KEY = "sd_architecture"

_ALLOWED = {
    "unet": {"attention_head_dim", "norm_num_groups", "sample_size", "upcast_attention", "addition_time_embed_dim"},
    "vae": {"norm_num_groups", "sample_size"},
    "text_encoder": {"num_attention_heads"},
    "text_encoder_2": {"num_attention_heads"},
}


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def _heads(width: int) -> int:
    return width // 64 if width % 64 == 0 else max(1, width // 8)


def parse_architecture_metadata(text: str | None, source: str) -> dict[str, dict[str, Any]]:
    """The saver's ``sd_architecture`` JSON, restricted to the settings the shapes cannot tell."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{source}: the '{ARCHITECTURE_METADATA_KEY}' metadata is not valid JSON ({err})") from err
    return {part: {k: v for k, v in (data.get(part) or {}).items() if k in keys} for part, keys in _ALLOWED.items()}


def architecture_metadata(unet_config, vae_config, text_config) -> str:
    """The JSON our saver stores so that a saved single file loads back with the same configs."""
    heads = unet_config["attention_head_dim"]
    return json.dumps(
        {
            "unet": {
                "attention_head_dim": list(heads) if isinstance(heads, (list, tuple)) else heads,
                "norm_num_groups": unet_config["norm_num_groups"],
                "sample_size": unet_config["sample_size"],
                "upcast_attention": bool(unet_config.get("upcast_attention", False)),
            },
            "vae": {"norm_num_groups": vae_config["norm_num_groups"], "sample_size": vae_config["sample_size"]},
            "text_encoder": {"num_attention_heads": text_config.num_attention_heads},
        },
        sort_keys=True,
    )


def infer_unet_config(sd: dict[str, torch.Tensor], family: ModelFamily, meta: dict[str, Any]) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` config from diffusers-named UNet weights."""
    levels = _count(sd, r"down_blocks\.(\d+)\.")
    channels = [sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)]
    attention = [f"down_blocks.{i}.attentions.0.proj_in.weight" in sd for i in range(levels)]
    depth = _count(sd, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")
    proj = sd["mid_block.attentions.0.proj_in.weight"]
    context = sd["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    variant = sd_variant(family)
    default_heads: Any = [_heads(c) for c in channels] if variant.per_level_heads else 8
    return dict(
        sample_size=meta.get("sample_size", family.default_resolution // 8),
        in_channels=sd["conv_in.weight"].shape[1],
        out_channels=sd["conv_out.weight"].shape[0],
        down_block_types=[("CrossAttnDownBlock2D" if a else "DownBlock2D") for a in attention],
        up_block_types=[("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in reversed(attention)],
        block_out_channels=channels,
        layers_per_block=_count(sd, r"down_blocks\.0\.resnets\.(\d+)\."),
        transformer_layers_per_block=depth,
        norm_num_groups=meta.get("norm_num_groups", 32),
        cross_attention_dim=context,
        attention_head_dim=meta.get("attention_head_dim", default_heads),
        use_linear_projection=proj.ndim == 2,
        upcast_attention=meta.get("upcast_attention", variant.upcast_attention),
    )


def infer_vae_config(sd: dict[str, torch.Tensor], family: ModelFamily, meta: dict[str, Any]) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` config from diffusers-named VAE weights."""
    levels = _count(sd, r"encoder\.down_blocks\.(\d+)\.")
    return dict(
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_channels=sd["decoder.conv_out.weight"].shape[0],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)],
        layers_per_block=_count(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        latent_channels=sd["encoder.conv_out.weight"].shape[0] // 2,
        norm_num_groups=meta.get("norm_num_groups", 32),
        sample_size=meta.get("sample_size", family.default_resolution),
        scaling_factor=family.latent_scale,
    )


def infer_text_config(sd: dict[str, torch.Tensor], family: ModelFamily, meta: dict[str, Any]):
    """transformers ``CLIPTextConfig`` from bare (no ``text_model.``) CLIP weights."""
    from transformers import CLIPTextConfig

    vocab, width = sd["embeddings.token_embedding.weight"].shape
    variant = sd_variant(family)
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(sd, r"encoder\.layers\.(\d+)\."),
        num_attention_heads=meta.get("num_attention_heads", _heads(width)),
        max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0],
        hidden_act=variant.hidden_act,
        projection_dim=width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=variant.pad_token_id,
    )
