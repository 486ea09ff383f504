"""Key conversion between the original (LDM / CompVis) single-file layout and diffusers/transformers modules.

The mapping is built from the model's structure (levels, layers per level, which levels have attention),
which is read from the keys themselves when loading and from the module configs when saving, so it works
for any size (real SD1.x/SD2.x and the tiny test models alike). Only names and, for the VAE attention
and the OpenCLIP fused q/k/v projection, shapes change; values are copied bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from library.errors import UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."

_UNET_RESNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)
_VAE_RESNET = (("nin_shortcut", "conv_shortcut"),)
_VAE_ATTENTION = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
_OPENCLIP_LAYER = (
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("attn.out_proj", "self_attn.out_proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)


@dataclass(frozen=True)
class Structure:
    """Levels of a UNet or VAE: ``attention[i]`` tells whether level ``i`` (down path) has attention."""

    attention: tuple[bool, ...]
    layers_per_block: int

    @property
    def levels(self) -> int:
        return len(self.attention)


@dataclass(frozen=True)
class _Pair:
    ldm: str
    diffusers: str
    inner: tuple[tuple[str, str], ...] = ()


def _rename(rest: str, inner: tuple[tuple[str, str], ...], reverse: bool) -> str:
    for a, b in inner:
        src, dst = (b, a) if reverse else (a, b)
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src) :]
    return rest


def _apply(
    tensors: dict[str, torch.Tensor], pairs: list[_Pair], reverse: bool, what: str
) -> dict[str, torch.Tensor]:
    table = {(p.diffusers if reverse else p.ldm) + ".": p for p in pairs}
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in tensors.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            pair = table.get(".".join(parts[:cut]) + ".")
            if pair is not None:
                rest = _rename(".".join(parts[cut:]), pair.inner, reverse)
                out[(pair.ldm if reverse else pair.diffusers) + "." + rest] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise UserError(
            f"{what}: {len(unknown)} weights do not fit the detected structure, e.g. {', '.join(sorted(unknown)[:5])}"
        )
    return out


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


# ----------------------------------------------------------------------------------------------- UNet


def unet_structure_from_ldm(keys: set[str]) -> Structure:
    """Read levels, layers per level and attention placement from LDM UNet keys (without prefix)."""
    blocks = _indices(keys, r"input_blocks\.(\d+)\.")
    levels: list[tuple[int, bool]] = []
    count, attention = 0, False
    for n in blocks[1:]:
        if f"input_blocks.{n}.0.op.weight" in keys:
            levels.append((count, attention))
            count, attention = 0, False
        else:
            count += 1
            attention = attention or f"input_blocks.{n}.1.norm.weight" in keys
    levels.append((count, attention))
    counts = {c for c, _ in levels}
    if not blocks or len(counts) != 1 or 0 in counts or "middle_block.1.norm.weight" not in keys:
        raise UserError("UNet: the checkpoint's input blocks do not form a Stable Diffusion UNet")
    return Structure(tuple(a for _, a in levels), counts.pop())


def unet_structure_from_config(config) -> Structure:
    return Structure(
        tuple("CrossAttn" in t for t in config["down_block_types"]), int(config["layers_per_block"])
    )


def _unet_pairs(s: Structure) -> list[_Pair]:
    L = s.layers_per_block
    pairs = [
        _Pair("time_embed.0", "time_embedding.linear_1"),
        _Pair("time_embed.2", "time_embedding.linear_2"),
        _Pair("input_blocks.0.0", "conv_in"),
        _Pair("middle_block.0", "mid_block.resnets.0", _UNET_RESNET),
        _Pair("middle_block.1", "mid_block.attentions.0"),
        _Pair("middle_block.2", "mid_block.resnets.1", _UNET_RESNET),
        _Pair("out.0", "conv_norm_out"),
        _Pair("out.2", "conv_out"),
        _Pair("label_emb.0.0", "add_embedding.linear_1"),  # SDXL's size/pooled-text embedding
        _Pair("label_emb.0.2", "add_embedding.linear_2"),
    ]
    for i, attn in enumerate(s.attention):
        for j in range(L):
            n = 1 + i * (L + 1) + j
            pairs.append(_Pair(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", _UNET_RESNET))
            if attn:
                pairs.append(_Pair(f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}"))
        if i < s.levels - 1:
            pairs.append(_Pair(f"input_blocks.{1 + i * (L + 1) + L}.0.op", f"down_blocks.{i}.downsamplers.0.conv"))
    for i in range(s.levels):
        attn = s.attention[s.levels - 1 - i]
        for j in range(L + 1):
            n = i * (L + 1) + j
            pairs.append(_Pair(f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", _UNET_RESNET))
            if attn:
                pairs.append(_Pair(f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}"))
            if j == L and i < s.levels - 1:
                pairs.append(_Pair(f"output_blocks.{n}.{2 if attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv"))
    return pairs


def unet_ldm_to_diffusers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _apply(tensors, _unet_pairs(unet_structure_from_ldm(set(tensors))), False, "UNet")


def unet_diffusers_to_ldm(tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    return _apply(tensors, _unet_pairs(unet_structure_from_config(config)), True, "UNet")


def unet_module_to_ldm(path: str, config) -> str:
    """The original-layout path of the diffusers UNet module at ``path`` (e.g. ``down_blocks.1.attentions.0``
    -> ``input_blocks.4.1`` for SDXL), for LoRA names that follow the original layout."""
    return next(iter(_apply({f"{path}.weight": None}, _unet_pairs(unet_structure_from_config(config)), True,
                            "UNet")))[: -len(".weight")]


# ----------------------------------------------------------------------------------------------- VAE


def _vae_structure(keys: set[str], ldm: bool) -> Structure:
    if ldm:
        levels = _indices(keys, r"encoder\.down\.(\d+)\.")
        layers = _indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")
    else:
        levels = _indices(keys, r"encoder\.down_blocks\.(\d+)\.")
        layers = _indices(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    if not levels or not layers:
        raise UserError("VAE: the weights do not look like a Stable Diffusion VAE (no encoder blocks found)")
    return Structure((False,) * len(levels), len(layers))


def _vae_pairs(s: Structure) -> list[_Pair]:
    pairs = [_Pair(name, name) for name in ("quant_conv", "post_quant_conv")]
    for side in ("encoder", "decoder"):
        pairs += [
            _Pair(f"{side}.conv_in", f"{side}.conv_in"),
            _Pair(f"{side}.conv_out", f"{side}.conv_out"),
            _Pair(f"{side}.norm_out", f"{side}.conv_norm_out"),
            _Pair(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", _VAE_RESNET),
            _Pair(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", _VAE_ATTENTION),
            _Pair(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", _VAE_RESNET),
        ]
    for i in range(s.levels):
        for j in range(s.layers_per_block):
            pairs.append(_Pair(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET))
        if i < s.levels - 1:
            pairs.append(_Pair(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
        k = s.levels - 1 - i
        for j in range(s.layers_per_block + 1):
            pairs.append(_Pair(f"decoder.up.{k}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", _VAE_RESNET))
        if i < s.levels - 1:
            pairs.append(_Pair(f"decoder.up.{k}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv"))
    return pairs


def _is_vae_attention_projection(key: str) -> bool:
    return ".mid_block.attentions." in key and key.endswith("weight") and ".group_norm." not in key


def vae_ldm_to_diffusers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = _apply(tensors, _vae_pairs(_vae_structure(set(tensors), ldm=True)), False, "VAE")
    return {
        k: (v.reshape(v.shape[:2]) if _is_vae_attention_projection(k) and v.ndim == 4 else v) for k, v in out.items()
    }


def vae_diffusers_to_ldm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    reshaped = {
        k: (v.reshape(*v.shape, 1, 1) if _is_vae_attention_projection(k) and v.ndim == 2 else v)
        for k, v in tensors.items()
    }
    return _apply(reshaped, _vae_pairs(_vae_structure(set(tensors), ldm=False)), True, "VAE")


def is_ldm_vae(keys) -> bool:
    return any(k.startswith("encoder.down.") for k in keys)


# ----------------------------------------------------------------------------------------------- text encoders


def strip_text_model_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare transformers CLIP keys (``embeddings.*``, ``encoder.*``, ``final_layer_norm.*``)."""
    return {(k[len("text_model.") :] if k.startswith("text_model.") else k): v for k, v in tensors.items()}


def clip_ldm_to_bare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD1 text encoder (``cond_stage_model.transformer.*`` already removed): old and new layouts."""
    out = strip_text_model_prefix(tensors)
    out.pop("embeddings.position_ids", None)
    return out


def clip_bare_to_ldm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"text_model." + k: v for k, v in strip_text_model_prefix(tensors).items()}


def openclip_to_bare(tensors: dict[str, torch.Tensor], *, with_projection: bool = False) -> dict[str, torch.Tensor]:
    """SD2 OpenCLIP text encoder -> transformers CLIP keys.

    SD2 uses the penultimate layer, so in a complete OpenCLIP model (one with ``text_projection``) the
    last residual block, ``text_projection`` and ``logit_scale`` are not part of the converted model and
    are dropped. Files written by converters that already removed them (no ``text_projection``, e.g.
    diffusers' script, 23 blocks for SD2) keep all their blocks. ``with_projection`` (SDXL's second encoder)
    keeps every block and gives ``text_projection.weight``: OpenCLIP computes ``x @ text_projection``, so the
    ``nn.Linear`` weight is its transpose (as diffusers and ComfyUI read it).
    """
    layers = _indices(tensors, r"transformer\.resblocks\.(\d+)\.")
    if not layers:
        raise UserError("text encoder: no OpenCLIP residual blocks found (cond_stage_model.model.transformer.*)")
    last = layers[-1] if "text_projection" in tensors and not with_projection else layers[-1] + 1
    pairs = [
        _Pair("ln_final", "final_layer_norm"),
        _Pair("token_embedding", "embeddings.token_embedding"),
    ]
    pairs += [_Pair(f"transformer.resblocks.{i}", f"encoder.layers.{i}", _OPENCLIP_LAYER) for i in range(last)]
    skipped = ("text_projection", "logit_scale", "attn_mask", f"transformer.resblocks.{last}.")
    kept = {k: v for k, v in tensors.items() if not k.startswith(skipped)}
    fused = {k: kept.pop(k) for k in [k for k in kept if ".attn.in_proj_" in k]}
    position = kept.pop("positional_embedding", None)
    out = _apply(kept, pairs, False, "text encoder (OpenCLIP)")
    if position is None:
        raise UserError("text encoder: cond_stage_model.model.positional_embedding is missing")
    out["embeddings.position_embedding.weight"] = position
    for key, value in fused.items():
        i = key.split(".")[2]
        kind = "weight" if key.endswith("weight") else "bias"
        for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
            out[f"encoder.layers.{i}.self_attn.{name}.{kind}"] = part.clone()
    if with_projection:
        if "text_projection" not in tensors:
            raise UserError("text encoder 2: text_projection is missing (conditioner.embedders.1.model.text_projection)")
        out["text_projection.weight"] = tensors["text_projection"].t().contiguous()
    return out


def bare_to_openclip(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP keys -> SD2 OpenCLIP layout, adding the unused last block (a copy of the one before),
    an identity ``text_projection`` and ``logit_scale`` so that other SD2 tools find a complete model. With a
    ``text_projection.weight`` (SDXL's second encoder) every block is real and the projection is stored
    transposed (OpenCLIP's ``x @ text_projection``)."""
    tensors = strip_text_model_prefix(tensors)
    projection = tensors.pop("text_projection.weight", None)
    tensors.pop("embeddings.position_ids", None)
    n = len(_indices(tensors, r"encoder\.layers\.(\d+)\."))
    pairs = [_Pair("ln_final", "final_layer_norm"), _Pair("token_embedding", "embeddings.token_embedding")]
    pairs += [_Pair(f"transformer.resblocks.{i}", f"encoder.layers.{i}", _OPENCLIP_LAYER) for i in range(n)]
    qkv_keys = [k for k in tensors if ".self_attn." in k and k.split(".")[-2] in ("q_proj", "k_proj", "v_proj")]
    qkv = {k: tensors.pop(k) for k in qkv_keys}
    position = tensors.pop("embeddings.position_embedding.weight")
    out = _apply(tensors, pairs, True, "text encoder")
    out["positional_embedding"] = position
    for i in range(n):
        for kind in ("weight", "bias"):
            parts = [qkv[f"encoder.layers.{i}.self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    width = position.shape[1]
    if projection is not None:
        out["text_projection"] = projection.t().contiguous()
        out["logit_scale"] = torch.tensor(4.6052, dtype=position.dtype)
        return out
    for key in [k for k in out if k.startswith(f"transformer.resblocks.{n - 1}.")]:
        out[key.replace(f"resblocks.{n - 1}.", f"resblocks.{n}.", 1)] = out[key].clone()
    out["text_projection"] = torch.eye(width, dtype=position.dtype)
    out["logit_scale"] = torch.tensor(4.6052, dtype=position.dtype)
    return out
