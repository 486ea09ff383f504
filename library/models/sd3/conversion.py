"""SD3 / SD3.5 MMDiT weights: the SAI single-file layout <-> diffusers' ``SD3Transformer2DModel``.

The single file (``sd3_medium.safetensors``, ``sd3.5_large.safetensors``) holds the MMDiT under
``model.diffusion_model.`` (``joint_blocks.N.{x_block,context_block}.*``), optionally the text encoders under
``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` and the VAE under ``first_stage_model.``. The MMDiT fuses
q, k and v into one ``qkv`` layer; diffusers splits them. The last joint block's context modulation and the
final layer's modulation keep (shift, scale) where diffusers keeps (scale, shift). Everything about the
architecture is read from tensor shapes (:func:`read_architecture`); the variant follows sd-scripts' rule:
qk-norm with extra ``x_block.attn2`` self-attention layers is SD3.5 Medium, qk-norm without them SD3.5 Large,
no qk-norm SD3 Medium.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Collection, Mapping, Sequence

import torch

SAI_PREFIX = "model.diffusion_model."
TEXT_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                 "t5xxl": "text_encoders.t5xxl.transformer."}
VAE_PREFIX = "first_stage_model."
SAI_HEAD_DIM = 64  # the SAI MMDiT fixes the head size; qk-norm files also store it in ln_q's shape

# (SAI module within joint block i, diffusers modules in fused row order). ``attn2`` exists only in the
# dual-attention layers; the last block's context block is "pre only" (no attn.proj, no mlp).
BLOCK_MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("x_block.attn.proj", ("attn.to_out.0",)),
    ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
    ("x_block.attn2.proj", ("attn2.to_out.0",)),
    ("x_block.mlp.fc1", ("ff.net.0.proj",)),
    ("x_block.mlp.fc2", ("ff.net.2",)),
    ("x_block.adaLN_modulation.1", ("norm1.linear",)),
    ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("context_block.attn.proj", ("attn.to_add_out",)),
    ("context_block.mlp.fc1", ("ff_context.net.0.proj",)),
    ("context_block.mlp.fc2", ("ff_context.net.2",)),
    ("context_block.adaLN_modulation.1", ("norm1_context.linear",)),
)
_BLOCK_NORMS = (
    ("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
    ("context_block.attn.ln_q", "attn.norm_added_q"), ("context_block.attn.ln_k", "attn.norm_added_k"),
    ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k"),
)
# (SAI module, diffusers module, modulation stored (shift, scale) in SAI order)
GLOBAL_MODULES: tuple[tuple[str, str, bool], ...] = (
    ("x_embedder.proj", "pos_embed.proj", False),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1", False),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2", False),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1", False),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2", False),
    ("context_embedder", "context_embedder", False),
    ("final_layer.linear", "proj_out", False),
    ("final_layer.adaLN_modulation.1", "norm_out.linear", True),
)


@dataclass(frozen=True)
class SD3Architecture:
    """The sizes of an MMDiT, all read from tensor shapes."""

    hidden_size: int
    depth: int
    patch_size: int
    in_channels: int
    out_channels: int
    head_dim: int
    context_in_dim: int  # T5 width (4096)
    pooled_in_dim: int  # CLIP-L + CLIP-G pooled (2048)
    pos_embed_max_size: int
    qk_norm: bool
    dual_attention_layers: tuple[int, ...] = ()

    @property
    def variant(self) -> str:
        """sd-scripts' ``model_type``: ``medium`` (SD3), ``5-medium`` or ``5-large`` (SD3.5)."""
        if not self.qk_norm:
            return "medium"
        return "5-medium" if self.dual_attention_layers else "5-large"

    def diffusers_config(self) -> dict[str, Any]:
        return dict(
            sample_size=128, patch_size=self.patch_size, in_channels=self.in_channels, num_layers=self.depth,
            attention_head_dim=self.head_dim, num_attention_heads=self.hidden_size // self.head_dim,
            joint_attention_dim=self.context_in_dim, caption_projection_dim=self.hidden_size,
            pooled_projection_dim=self.pooled_in_dim, out_channels=self.out_channels,
            pos_embed_max_size=self.pos_embed_max_size, dual_attention_layers=self.dual_attention_layers,
            qk_norm="rms_norm" if self.qk_norm else None,
        )


def strip_prefix(keys: Collection[str]) -> set[str]:
    return {k[len(SAI_PREFIX):] if k.startswith(SAI_PREFIX) else k for k in keys}


def layout_of(keys: Collection[str]) -> str | None:
    """``sai`` (``joint_blocks.*``, with or without ``model.diffusion_model.``), ``diffusers``
    (``SD3Transformer2DModel`` names) or None."""
    names = set(keys)
    if any(k.startswith(("joint_blocks.", SAI_PREFIX + "joint_blocks.")) for k in names):
        return "sai"
    if "pos_embed.proj.weight" in names and "transformer_blocks.0.attn.add_q_proj.weight" in names:
        return "diffusers"
    return None


def _indices(keys: Collection[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def read_architecture(shapes: Mapping[str, Sequence[int]]) -> SD3Architecture:
    """Sizes of SAI-named MMDiT weights (prefix stripped or not; a header's shapes are enough)."""
    s = {(k[len(SAI_PREFIX):] if k.startswith(SAI_PREFIX) else k): tuple(v) for k, v in shapes.items()}
    hidden, in_channels, patch, _ = s["x_embedder.proj.weight"]
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in s
    head_dim = s["joint_blocks.0.x_block.attn.ln_q.weight"][0] if qk_norm else SAI_HEAD_DIM
    return SD3Architecture(
        hidden_size=hidden, depth=len(_indices(s, r"joint_blocks\.(\d+)\.")), patch_size=patch,
        in_channels=in_channels, out_channels=s["final_layer.linear.weight"][0] // (patch * patch),
        head_dim=head_dim, context_in_dim=s["context_embedder.weight"][1],
        pooled_in_dim=s["y_embedder.mlp.0.weight"][1],
        pos_embed_max_size=round(math.sqrt(s["pos_embed"][1])), qk_norm=qk_norm,
        dual_attention_layers=tuple(_indices(s, r"joint_blocks\.(\d+)\.x_block\.attn2\.")),
    )


def architecture_of_diffusers(shapes: Mapping[str, Sequence[int]]) -> SD3Architecture:
    """Sizes of diffusers-named ``SD3Transformer2DModel`` weights."""
    s = {k: tuple(v) for k, v in shapes.items()}
    hidden, in_channels, patch, _ = s["pos_embed.proj.weight"]
    qk_norm = "transformer_blocks.0.attn.norm_q.weight" in s
    return SD3Architecture(
        hidden_size=hidden, depth=len(_indices(s, r"transformer_blocks\.(\d+)\.")), patch_size=patch,
        in_channels=in_channels, out_channels=s["proj_out.weight"][0] // (patch * patch),
        head_dim=s["transformer_blocks.0.attn.norm_q.weight"][0] if qk_norm else SAI_HEAD_DIM,
        context_in_dim=s["context_embedder.weight"][1],
        pooled_in_dim=s["time_text_embed.text_embedder.linear_1.weight"][1],
        pos_embed_max_size=round(math.sqrt(s["pos_embed.pos_embed"][1])), qk_norm=qk_norm,
        dual_attention_layers=tuple(_indices(s, r"transformer_blocks\.(\d+)\.attn2\.")),
    )


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift) along the first axis."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def module_pairs(arch: SD3Architecture) -> list[tuple[str, tuple[str, ...], bool]]:
    """Every Linear/Conv of the MMDiT as (SAI path, diffusers paths in fused row order, rows swapped)."""
    pairs = []
    for i in range(arch.depth):
        last = i == arch.depth - 1
        for sai, parts in BLOCK_MODULES:
            if ".attn2." in sai and i not in arch.dual_attention_layers:
                continue
            if last and sai.startswith("context_block.") and sai.endswith(("attn.proj", "fc1", "fc2")):
                continue
            swapped = last and sai == "context_block.adaLN_modulation.1"
            pairs.append((f"joint_blocks.{i}.{sai}", tuple(f"transformer_blocks.{i}.{p}" for p in parts), swapped))
    pairs += [(sai, (dif,), swapped) for sai, dif, swapped in GLOBAL_MODULES]
    return pairs


def _norm_pairs(arch: SD3Architecture) -> list[tuple[str, str]]:
    if not arch.qk_norm:
        return []
    pairs = []
    for i in range(arch.depth):
        for sai, dif in _BLOCK_NORMS:
            if ".attn2." in sai and i not in arch.dual_attention_layers:
                continue
            pairs.append((f"joint_blocks.{i}.{sai}.weight", f"transformer_blocks.{i}.{dif}.weight"))
    return pairs


def sai_to_diffusers(state: dict[str, torch.Tensor], arch: SD3Architecture | None = None) -> dict[str, torch.Tensor]:
    """SAI MMDiT weights (prefixed or not) -> ``SD3Transformer2DModel`` names; bit-exact, any dtype. Keys the
    conversion does not know raise a ``KeyError`` naming them (nothing is dropped silently)."""
    sd = {(k[len(SAI_PREFIX):] if k.startswith(SAI_PREFIX) else k): v for k, v in state.items()}
    arch = arch or read_architecture({k: v.shape for k, v in sd.items()})
    out = {"pos_embed.pos_embed": sd.pop("pos_embed")}
    for sai, parts, swapped in module_pairs(arch):
        for kind in ("weight", "bias"):
            tensor = sd.pop(f"{sai}.{kind}", None)
            if tensor is None:
                continue
            tensor = swap_halves(tensor) if swapped else tensor
            for part, chunk in zip(parts, tensor.chunk(len(parts), dim=0)):
                out[f"{part}.{kind}"] = chunk.contiguous() if len(parts) > 1 else chunk
    for sai, dif in _norm_pairs(arch):
        out[dif] = sd.pop(sai)
    if sd:
        raise KeyError(f"unknown SD3 MMDiT weights: {', '.join(sorted(sd)[:8])}")
    return out


def diffusers_to_sai(state: dict[str, torch.Tensor], arch: SD3Architecture | None = None, *,
                     prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of :func:`sai_to_diffusers` (``prefix`` ``model.diffusion_model.`` for a single file)."""
    sd = dict(state)
    arch = arch or architecture_of_diffusers({k: v.shape for k, v in sd.items()})
    out = {prefix + "pos_embed": sd.pop("pos_embed.pos_embed")}
    for sai, parts, swapped in module_pairs(arch):
        for kind in ("weight", "bias"):
            chunks = [sd.pop(f"{p}.{kind}", None) for p in parts]
            if any(c is None for c in chunks):
                continue
            tensor = torch.cat(chunks, dim=0) if len(chunks) > 1 else chunks[0]
            out[f"{prefix}{sai}.{kind}"] = swap_halves(tensor) if swapped else tensor
    for sai, dif in _norm_pairs(arch):
        out[prefix + sai] = sd.pop(dif)
    if sd:
        raise KeyError(f"unknown SD3Transformer2DModel weights: {', '.join(sorted(sd)[:8])}")
    return out


def split_single_file(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The parts of a single file by role (``mmdit``, ``clip_l``, ``clip_g``, ``t5xxl``, ``vae``), prefixes
    removed; absent parts are absent from the result."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    prefixes = {"mmdit": SAI_PREFIX, **TEXT_PREFIXES, "vae": VAE_PREFIX}
    for key in list(state):
        for role, prefix in prefixes.items():
            if key.startswith(prefix):
                parts.setdefault(role, {})[key[len(prefix):]] = state.pop(key)
                break
    if layout_of(state) == "sai":  # an MMDiT without the prefix
        parts["mmdit"] = {**state, **parts.get("mmdit", {})}
    return parts


def parts_in_file(keys: Collection[str]) -> set[str]:
    """Which parts a single file holds (header only)."""
    found = set()
    if layout_of(keys) == "sai":
        found.add("mmdit")
    for role, prefix in TEXT_PREFIXES.items():
        if any(k.startswith(prefix) for k in keys):
            found.add(role)
    if any(k.startswith(VAE_PREFIX) for k in keys):
        found.add("vae")
    return found
