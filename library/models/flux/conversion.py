"""FLUX.1 transformer weights: the BFL single-file layout <-> diffusers ``FluxTransformer2DModel``.

The BFL layout (``flux1-dev.safetensors``; ComfyUI files add ``model.diffusion_model.``) keeps fused
projections: ``double_blocks.N.{img,txt}_attn.qkv`` (q, k, v stacked) and ``single_blocks.N.linear1``
(q, k, v and the MLP input stacked). diffusers splits them into ``to_q/to_k/to_v(/proj_mlp)``. The final
layer's modulation is stored (shift, scale) in BFL and (scale, shift) in diffusers.

The architecture is read from tensor shapes (widths, depths, head size from the qk-norm scale, dev vs
schnell from the guidance embedding), never from a hard-coded 3072, so tiny test models convert too.
The rotary axes are not stored in the weights: FLUX.1's (16, 56, 56) for head size 128, else
``(d/8, (d - d/8)/2, (d - d/8)/2)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

COMFY_PREFIX = "model.diffusion_model."
BFL_MARKER = "double_blocks.0.img_attn.qkv.weight"
DIFFUSERS_MARKER = "transformer_blocks.0.attn.to_q.weight"

# global renames (BFL -> diffusers), each for .weight and .bias
_GLOBAL = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
# per double block (BFL suffix -> diffusers suffix); parameters are named in full
_DOUBLE = {
    "img_mod.lin.weight": "norm1.linear.weight", "img_mod.lin.bias": "norm1.linear.bias",
    "txt_mod.lin.weight": "norm1_context.linear.weight", "txt_mod.lin.bias": "norm1_context.linear.bias",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_attn.proj.weight": "attn.to_out.0.weight", "img_attn.proj.bias": "attn.to_out.0.bias",
    "txt_attn.proj.weight": "attn.to_add_out.weight", "txt_attn.proj.bias": "attn.to_add_out.bias",
    "img_mlp.0.weight": "ff.net.0.proj.weight", "img_mlp.0.bias": "ff.net.0.proj.bias",
    "img_mlp.2.weight": "ff.net.2.weight", "img_mlp.2.bias": "ff.net.2.bias",
    "txt_mlp.0.weight": "ff_context.net.0.proj.weight", "txt_mlp.0.bias": "ff_context.net.0.proj.bias",
    "txt_mlp.2.weight": "ff_context.net.2.weight", "txt_mlp.2.bias": "ff_context.net.2.bias",
}
_SINGLE = {
    "modulation.lin.weight": "norm.linear.weight", "modulation.lin.bias": "norm.linear.bias",
    "norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight",
    "linear2.weight": "proj_out.weight", "linear2.bias": "proj_out.bias",
}
# fused BFL layers and the diffusers layers they split into, in row order
DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")


@dataclass(frozen=True)
class FluxArchitecture:
    """Sizes of a FLUX.1 transformer, as read from its weights."""

    hidden_size: int
    num_heads: int
    depth: int
    depth_single: int
    in_channels: int
    out_channels: int
    context_in_dim: int
    vec_in_dim: int
    mlp_hidden: int
    guidance_embed: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def variant(self) -> str:
        """``dev`` (guidance-distilled, has the guidance embedding) or ``schnell``."""
        return "dev" if self.guidance_embed else "schnell"

    @property
    def axes_dims_rope(self) -> tuple[int, int, int]:
        if self.head_dim == 128:
            return (16, 56, 56)
        first = self.head_dim // 8
        rest = (self.head_dim - first) // 2
        return (first, rest, rest)

    def single_split(self) -> tuple[int, int, int, int]:
        """Row sizes of ``linear1``: q, k, v, MLP input."""
        h = self.hidden_size
        return (h, h, h, self.mlp_hidden)

    def diffusers_config(self) -> dict[str, Any]:
        """``FluxTransformer2DModel`` keyword arguments."""
        return dict(
            patch_size=1, in_channels=self.in_channels, out_channels=self.out_channels, num_layers=self.depth,
            num_single_layers=self.depth_single, attention_head_dim=self.head_dim, num_attention_heads=self.num_heads,
            joint_attention_dim=self.context_in_dim, pooled_projection_dim=self.vec_in_dim,
            guidance_embeds=self.guidance_embed, axes_dims_rope=self.axes_dims_rope,
        )

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "FluxArchitecture":
        hidden = config["attention_head_dim"] * config["num_attention_heads"]
        return cls(
            hidden_size=hidden, num_heads=config["num_attention_heads"], depth=config["num_layers"],
            depth_single=config["num_single_layers"], in_channels=config["in_channels"],
            out_channels=config.get("out_channels") or config["in_channels"],
            context_in_dim=config["joint_attention_dim"], vec_in_dim=config["pooled_projection_dim"],
            mlp_hidden=4 * hidden, guidance_embed=bool(config["guidance_embeds"]),
        )


def strip_comfy_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ComfyUI's ``model.diffusion_model.`` prefix where present."""
    return {(k[len(COMFY_PREFIX):] if k.startswith(COMFY_PREFIX) else k): v for k, v in state.items()}


def layout_of(keys: Iterable[str]) -> str | None:
    """``bfl``, ``diffusers`` or None (not a FLUX transformer), from the key names alone."""
    names = {k[len(COMFY_PREFIX):] if k.startswith(COMFY_PREFIX) else k for k in keys}
    if BFL_MARKER in names:
        return "bfl"
    if DIFFUSERS_MARKER in names and any(k.startswith("single_transformer_blocks.") for k in names):
        return "diffusers"
    return None


def _count(keys: Iterable[str], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def read_architecture(shapes: Mapping[str, Sequence[int]]) -> FluxArchitecture:
    """The architecture of BFL-named weights from their shapes (a safetensors header is enough)."""
    shapes = strip_comfy_prefix(shapes)
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    return FluxArchitecture(
        hidden_size=int(hidden), num_heads=int(hidden) // int(head_dim),
        depth=_count(shapes, r"double_blocks\.(\d+)\."), depth_single=_count(shapes, r"single_blocks\.(\d+)\."),
        in_channels=int(in_channels), out_channels=int(shapes["final_layer.linear.weight"][0]),
        context_in_dim=int(shapes["txt_in.weight"][1]), vec_in_dim=int(shapes["vector_in.in_layer.weight"][1]),
        mlp_hidden=int(shapes["double_blocks.0.img_mlp.0.weight"][0]),
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _pairs(arch: FluxArchitecture) -> list[tuple[str, str]]:
    """Every one-to-one parameter rename (BFL name, diffusers name)."""
    pairs = []
    for bfl, dif in _GLOBAL.items():
        if bfl.startswith("guidance_in") and not arch.guidance_embed:
            continue
        pairs += [(f"{bfl}.weight", f"{dif}.weight"), (f"{bfl}.bias", f"{dif}.bias")]
    for i in range(arch.depth):
        pairs += [(f"double_blocks.{i}.{b}", f"transformer_blocks.{i}.{d}") for b, d in _DOUBLE.items()]
    for i in range(arch.depth_single):
        pairs += [(f"single_blocks.{i}.{b}", f"single_transformer_blocks.{i}.{d}") for b, d in _SINGLE.items()]
    return pairs


def fused_layers(arch: FluxArchitecture) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """Every fused BFL layer: (BFL module, diffusers modules, their row sizes)."""
    h = arch.hidden_size
    out = []
    for i in range(arch.depth):
        for bfl, parts in DOUBLE_FUSED.items():
            out.append((f"double_blocks.{i}.{bfl}", tuple(f"transformer_blocks.{i}.{p}" for p in parts), (h, h, h)))
    for i in range(arch.depth_single):
        for bfl, parts in SINGLE_FUSED.items():
            out.append((f"single_blocks.{i}.{bfl}", tuple(f"single_transformer_blocks.{i}.{p}" for p in parts),
                        arch.single_split()))
    return out


def bfl_to_diffusers(state: Mapping[str, torch.Tensor], arch: FluxArchitecture | None = None) -> dict[str, torch.Tensor]:
    """Convert BFL-named weights (any dtype, fp8 included) to ``FluxTransformer2DModel`` names.

    Raises ``KeyError`` naming the first missing tensor and ``ValueError`` listing unexpected ones.
    """
    state = strip_comfy_prefix(state)
    arch = arch or read_architecture({k: tuple(v.shape) for k, v in state.items()})
    out: dict[str, torch.Tensor] = {}
    used = set()
    for bfl, dif in _pairs(arch):
        out[dif] = state[bfl]
        used.add(bfl)
    for bfl, parts, sizes in fused_layers(arch):
        for suffix in ("weight", "bias"):
            chunks = torch.split(state[f"{bfl}.{suffix}"], list(sizes), dim=0)
            out.update({f"{p}.{suffix}": c for p, c in zip(parts, chunks)})
            used.add(f"{bfl}.{suffix}")
    for suffix in ("weight", "bias"):
        out[f"{FINAL_MOD[1]}.{suffix}"] = _swap_halves(state[f"{FINAL_MOD[0]}.{suffix}"])
        used.add(f"{FINAL_MOD[0]}.{suffix}")
    extra = sorted(set(state) - used)
    if extra:
        raise ValueError(f"{len(extra)} unexpected tensors in a FLUX transformer, e.g. {extra[:3]}")
    return out


def diffusers_to_bfl(state: Mapping[str, torch.Tensor], arch: FluxArchitecture) -> dict[str, torch.Tensor]:
    """Convert ``FluxTransformer2DModel`` weights to BFL names (the inverse of :func:`bfl_to_diffusers`)."""
    return {name: make() for name, make in diffusers_to_bfl_lazy(state, arch).items()}


def diffusers_to_bfl_lazy(state: Mapping[str, torch.Tensor],
                          arch: FluxArchitecture) -> dict[str, Callable[[], torch.Tensor]]:
    """:func:`diffusers_to_bfl` with each BFL tensor made only when its function is called (``--mem_eff_save``
    writes them one at a time)."""
    out: dict[str, Callable[[], torch.Tensor]] = {}
    used = set()
    for bfl, dif in _pairs(arch):
        out[bfl] = lambda dif=dif: state[dif]
        used.add(dif)
    for bfl, parts, _sizes in fused_layers(arch):
        for suffix in ("weight", "bias"):
            names = [f"{p}.{suffix}" for p in parts]
            out[f"{bfl}.{suffix}"] = lambda names=names: torch.cat([state[n] for n in names], dim=0)
            used.update(names)
    for suffix in ("weight", "bias"):
        out[f"{FINAL_MOD[0]}.{suffix}"] = lambda name=f"{FINAL_MOD[1]}.{suffix}": _swap_halves(state[name])
        used.add(f"{FINAL_MOD[1]}.{suffix}")
    missing = sorted(used - set(state))
    if missing:
        raise KeyError(missing[0])
    extra = sorted(set(state) - used)
    if extra:
        raise ValueError(f"{len(extra)} unexpected tensors in a FluxTransformer2DModel, e.g. {extra[:3]}")
    return out
