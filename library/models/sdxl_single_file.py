"""SDXL single files in the ``sd_xl_base_1.0.safetensors`` layout: reading (configs from tensor shapes)
and writing.

``model.diffusion_model.*`` is the original UNet (``label_emb`` is diffusers' ``add_embedding``),
``conditioner.embedders.0.transformer.text_model.*`` the CLIP ViT-L (transformers names),
``conditioner.embedders.1.model.*`` the OpenCLIP bigG (its ``text_projection`` is stored as OpenCLIP
multiplies, ``x @ P``: the ``nn.Linear`` weight is ``P.T``, as diffusers and ComfyUI read it; sd-scripts
copies it untransposed), ``first_stage_model.*`` the VAE.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from library.models import ldm_conversion as conv
from library.models.architecture import (
    ARCHITECTURE_METADATA_KEY,
    _count,
    _heads,
    infer_text_config,
    infer_vae_config,
    parse_architecture_metadata,
)
from library.models.families import ModelFamily, sd_family
from library.models.families.sdxl import TE1_PREFIX, TE2_PREFIX
from library.models.loading import _build_unet, _build_vae, _infer, _split_prefix
from library.models.weights import read_weights


def infer_sdxl_unet_config(sd: dict[str, torch.Tensor], family: ModelFamily, meta: dict[str, Any]) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` config (``addition_embed_type="text_time"``) from diffusers-named
    SDXL UNet weights; head counts are ``width // 64`` (SDXL's head dim) unless the metadata says otherwise."""
    levels = _count(sd, r"down_blocks\.(\d+)\.")
    channels = [sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)]
    attention = [f"down_blocks.{i}.attentions.0.proj_in.weight" in sd for i in range(levels)]
    depths = [_count(sd, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") or 1
              for i in range(levels)]
    added = sd["add_embedding.linear_1.weight"].shape[1]
    pooled = meta.get("pooled_dim")
    time_dim = meta.get("addition_time_embed_dim") or (added - pooled) // 6
    return dict(
        sample_size=meta.get("sample_size", family.default_resolution // 8),
        in_channels=sd["conv_in.weight"].shape[1],
        out_channels=sd["conv_out.weight"].shape[0],
        down_block_types=[("CrossAttnDownBlock2D" if a else "DownBlock2D") for a in attention],
        up_block_types=[("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in reversed(attention)],
        block_out_channels=channels,
        layers_per_block=_count(sd, r"down_blocks\.0\.resnets\.(\d+)\."),
        transformer_layers_per_block=depths,
        norm_num_groups=meta.get("norm_num_groups", 32),
        cross_attention_dim=sd["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        attention_head_dim=meta.get("attention_head_dim", [_heads(c) for c in channels]),
        use_linear_projection=sd["mid_block.attentions.0.proj_in.weight"].ndim == 2,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=added,
    )


def load_sdxl_single_file(path: Path, family: ModelFamily, dtype, device, *, with_vae: bool) -> tuple[Any, Any, list]:
    """UNet, VAE (None without ``with_vae``) and the two text encoders of an SDXL single file."""
    from library.models.sdxl_loading import build_sdxl_text_encoders

    tensors, metadata = read_weights(path)
    meta = parse_architecture_metadata(metadata.get(ARCHITECTURE_METADATA_KEY), str(path))
    unet_sd = conv.unet_ldm_to_diffusers(_split_prefix(tensors, conv.UNET_PREFIX))
    vae_sd = conv.vae_ldm_to_diffusers(_split_prefix(tensors, conv.VAE_PREFIX)) if with_vae else None
    te1_sd = conv.strip_text_model_prefix(_split_prefix(tensors, TE1_PREFIX))
    te2_sd = conv.openclip_to_bare(_split_prefix(tensors, TE2_PREFIX), with_projection=True)
    tensors.clear()
    what = {k: f"{path} ({k})" for k in ("UNet", "VAE", "text encoder 1", "text encoder 2")}
    te1_config = _infer(infer_text_config, te1_sd, sd_family(), meta.get("text_encoder", {}), what["text encoder 1"])
    te2_config = _infer(infer_text_config, te2_sd, sd_family(v2=True), meta.get("text_encoder_2", {}),
                        what["text encoder 2"])
    te2_config.projection_dim = te2_sd["text_projection.weight"].shape[0]
    unet_meta = {**meta.get("unet", {}), "pooled_dim": te2_config.projection_dim}
    unet_config = _infer(infer_sdxl_unet_config, unet_sd, family, unet_meta, what["UNet"])
    unet = _build_unet(unet_config, unet_sd, what["UNet"], dtype, device)
    vae = None
    if with_vae:
        vae_config = _infer(infer_vae_config, vae_sd, family, meta.get("vae", {}), what["VAE"])
        vae = _build_vae(vae_config, vae_sd, what["VAE"], dtype, device)
    text_encoders = build_sdxl_text_encoders(te1_config, te2_config, te1_sd, te2_sd, str(path), dtype, device)
    return unet, vae, text_encoders


def sdxl_ldm_state_dict(unet, vae, text_encoders) -> dict[str, torch.Tensor]:
    """All weights in the single-file layout (the inverse of :func:`load_sdxl_single_file`)."""
    out = {conv.UNET_PREFIX + k: v for k, v in conv.unet_diffusers_to_ldm(unet.state_dict(), unet.config).items()}
    out.update({conv.VAE_PREFIX + k: v for k, v in conv.vae_diffusers_to_ldm(vae.state_dict()).items()})
    te1 = conv.clip_bare_to_ldm(text_encoders[0].state_dict())
    te1.pop("text_model.embeddings.position_ids", None)
    out.update({TE1_PREFIX + k: v for k, v in te1.items()})
    out.update({TE2_PREFIX + k: v for k, v in conv.bare_to_openclip(text_encoders[1].state_dict()).items()})
    return out


def sdxl_architecture_metadata(unet, vae, text_encoders) -> str:
    """The ``sd_architecture`` JSON of an SDXL single file: the settings its shapes cannot tell."""
    heads = unet.config["attention_head_dim"]
    return json.dumps({
        "unet": {"attention_head_dim": list(heads) if isinstance(heads, (list, tuple)) else heads,
                 "norm_num_groups": unet.config["norm_num_groups"], "sample_size": unet.config["sample_size"],
                 "addition_time_embed_dim": unet.config["addition_time_embed_dim"]},
        "vae": {"norm_num_groups": vae.config["norm_num_groups"], "sample_size": vae.config["sample_size"]},
        "text_encoder": {"num_attention_heads": text_encoders[0].config.num_attention_heads},
        "text_encoder_2": {"num_attention_heads": text_encoders[1].config.num_attention_heads},
    }, sort_keys=True)
