"""Lumina Image 2.0 transformer weights: the Next-DiT single-file layout <-> diffusers ``Lumina2Transformer2DModel``.

The single file (``lumina_2_model_bf16.safetensors``; ComfyUI / Neta files add ``model.diffusion_model.``)
keeps one fused ``attention.qkv`` per block (q, then k and v of the grouped key/value heads), names the feed
forward ``w1/w2/w3`` and the modulation ``adaLN_modulation.1``, and carries an unused ``norm_final.weight``.
diffusers splits q/k/v into ``attn.to_q/to_k/to_v``. The names follow diffusers' ``convert_lumina2_to_diffusers``,
whose q/k/v split is hard-coded to the 2B model's 2304/768/768; here every size is read from tensor shapes
(width, depths, head size from the qk-norm scale, key/value heads from the fused rows), so tiny models convert
too. The rotary axes are not stored: three equal thirds of the head size (2B: 96 -> 32, 32, 32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Mapping

import torch

COMFY_PREFIX = "model.diffusion_model."
NEXTDIT_MARKER = "layers.0.attention.qkv.weight"
DIFFUSERS_MARKER = "layers.0.attn.to_q.weight"
AXES_LENS = (300, 512, 512)

_GLOBAL = (  # single-file prefix -> diffusers prefix
    ("t_embedder.mlp.0.", "time_caption_embed.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "time_caption_embed.timestep_embedder.linear_2."),
    ("cap_embedder.", "time_caption_embed.caption_embedder."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear_1."),
    ("final_layer.linear.", "norm_out.linear_2."),
)
_BLOCK = (  # single-file block suffix -> diffusers block suffix (blocks with modulation)
    ("attention.out.weight", "attn.to_out.0.weight"), ("attention.q_norm.weight", "attn.norm_q.weight"),
    ("attention.k_norm.weight", "attn.norm_k.weight"), ("feed_forward.w1.weight", "feed_forward.linear_1.weight"),
    ("feed_forward.w2.weight", "feed_forward.linear_2.weight"),
    ("feed_forward.w3.weight", "feed_forward.linear_3.weight"),
    ("adaLN_modulation.1.weight", "norm1.linear.weight"), ("adaLN_modulation.1.bias", "norm1.linear.bias"),
    ("attention_norm1.weight", "norm1.norm.weight"), ("attention_norm2.weight", "norm2.weight"),
    ("ffn_norm1.weight", "ffn_norm1.weight"), ("ffn_norm2.weight", "ffn_norm2.weight"),
)
_CONTEXT = {"attention_norm1.weight": "norm1.weight"}  # the context refiner has no modulation
QKV_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v")
BLOCK_KINDS = ("layers", "noise_refiner", "context_refiner")


def strip_prefix(keys: Collection[str]) -> set[str]:
    return {k[len(COMFY_PREFIX):] if k.startswith(COMFY_PREFIX) else k for k in keys}


def layout_of(keys: Collection[str]) -> str | None:
    """``"nextdit"`` (the single file), ``"diffusers"`` (``Lumina2Transformer2DModel`` names) or None."""
    names = strip_prefix(keys)
    if NEXTDIT_MARKER in names and "cap_embedder.1.weight" in names:
        return "nextdit"
    if DIFFUSERS_MARKER in names and "time_caption_embed.caption_embedder.1.weight" in names:
        return "diffusers"
    return None


@dataclass(frozen=True)
class LuminaArchitecture:
    """Sizes of a Lumina 2 transformer, as read from its weights."""

    hidden_size: int
    num_layers: int
    num_refiner_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden: int
    in_channels: int
    patch_size: int
    cap_feat_dim: int
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def axes_dims(self) -> tuple[int, int, int]:
        third = self.head_dim // 3
        return (self.head_dim - 2 * third, third, third)

    def problems(self) -> list[str]:
        """Why diffusers cannot build this architecture (empty when it can)."""
        if self.head_dim % 6:
            return [f"head size {self.head_dim} cannot be split into three even rotary axes"]
        return []

    def _ffn_args(self) -> dict[str, Any]:
        base = 4 * self.hidden_size
        if 256 * -(-base // 256) == self.ffn_hidden:
            return {"multiple_of": 256, "ffn_dim_multiplier": None}
        if self.ffn_hidden >= base:
            return {"multiple_of": self.ffn_hidden, "ffn_dim_multiplier": None}
        return {"multiple_of": 1, "ffn_dim_multiplier": self.ffn_hidden / base}

    def diffusers_config(self) -> dict[str, Any]:
        return dict(
            sample_size=128, patch_size=self.patch_size, in_channels=self.in_channels, out_channels=self.in_channels,
            hidden_size=self.hidden_size, num_layers=self.num_layers, num_refiner_layers=self.num_refiner_layers,
            num_attention_heads=self.num_heads, num_kv_heads=self.num_kv_heads, norm_eps=self.norm_eps,
            axes_dim_rope=self.axes_dims, axes_lens=AXES_LENS, cap_feat_dim=self.cap_feat_dim, **self._ffn_args(),
        )


def _count(names: Collection[str], prefix: str) -> int:
    return len({k.split(".")[1] for k in names if k.startswith(prefix)})


def read_architecture(shapes: Mapping[str, tuple[int, ...]]) -> LuminaArchitecture:
    """The architecture of single-file (Next-DiT) or diffusers weights, from names and shapes only."""
    shapes = {k[len(COMFY_PREFIX):] if k.startswith(COMFY_PREFIX) else k: tuple(v) for k, v in shapes.items()}
    nextdit = layout_of(shapes) == "nextdit"
    hidden, x_in = shapes["x_embedder.weight"]
    head_dim = shapes["layers.0.attention.q_norm.weight" if nextdit else "layers.0.attn.norm_q.weight"][0]
    if nextdit:
        kv_rows = (shapes["layers.0.attention.qkv.weight"][0] - hidden) // 2
        ffn = shapes["layers.0.feed_forward.w1.weight"][0]
        cap = shapes["cap_embedder.0.weight"][0]
    else:
        kv_rows = shapes["layers.0.attn.to_k.weight"][0]
        ffn = shapes["layers.0.feed_forward.linear_1.weight"][0]
        cap = shapes["time_caption_embed.caption_embedder.0.weight"][0]
    patch = int(round((x_in / 16) ** 0.5))  # the FLUX AE's 16 latent channels
    return LuminaArchitecture(
        hidden_size=hidden, num_layers=_count(shapes, "layers."), num_refiner_layers=_count(shapes, "noise_refiner."),
        num_heads=hidden // head_dim, num_kv_heads=kv_rows // head_dim, ffn_hidden=ffn, in_channels=x_in // patch**2,
        patch_size=patch, cap_feat_dim=cap,
    )


def _block_map(kind: str) -> list[tuple[str, str]]:
    if kind == "context_refiner":
        return [(a, _CONTEXT.get(a, b)) for a, b in _BLOCK if not a.startswith("adaLN")]
    return list(_BLOCK)


def nextdit_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Single-file weights (with or without ``model.diffusion_model.``) -> diffusers names; qkv split by the
    sizes read from the shapes. ``norm_final.weight`` (unused by the model) is dropped."""
    state = {k[len(COMFY_PREFIX):] if k.startswith(COMFY_PREFIX) else k: v for k, v in state.items()}
    arch = read_architecture({k: tuple(v.shape) for k, v in state.items()})
    kv = arch.num_kv_heads * arch.head_dim
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "norm_final.weight":
            continue
        parts = key.split(".")
        if parts[0] in BLOCK_KINDS:
            block, suffix = ".".join(parts[:2]), ".".join(parts[2:])
            if suffix == "attention.qkv.weight":
                for name, piece in zip(QKV_PARTS, torch.split(value, [arch.hidden_size, kv, kv], dim=0)):
                    # own storage: views of one tensor share autograd's version counter, so updating to_q in
                    # place (a fused backward pass) would invalidate to_k's saved weight
                    out[f"{block}.{name}.weight"] = piece.clone()
                continue
            mapping = dict(_block_map(parts[0]))
            if suffix not in mapping:
                raise KeyError(f"unknown Lumina weight {key}")
            out[f"{block}.{mapping[suffix]}"] = value
            continue
        for old, new in _GLOBAL:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def diffusers_to_nextdit(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers weights -> the single-file layout sd-scripts and ComfyUI load (with ``norm_final.weight``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in BLOCK_KINDS:
            block, suffix = ".".join(parts[:2]), ".".join(parts[2:])
            if suffix == "attn.to_q.weight":
                out[f"{block}.attention.qkv.weight"] = torch.cat(
                    [state[f"{block}.{name}.weight"] for name in QKV_PARTS], dim=0)
                continue
            if suffix in ("attn.to_k.weight", "attn.to_v.weight"):
                continue
            reverse = {b: a for a, b in _block_map(parts[0])}
            if suffix not in reverse:
                raise KeyError(f"unknown Lumina weight {key}")
            out[f"{block}.{reverse[suffix]}"] = value
            continue
        for old, new in _GLOBAL:
            if key.startswith(new):
                key = old + key[len(new):]
                break
        out[key] = value
    hidden = state["x_embedder.weight"].shape[0]
    out["norm_final.weight"] = torch.ones(hidden, dtype=state["x_embedder.weight"].dtype,
                                          device=state["x_embedder.weight"].device)
    return out
