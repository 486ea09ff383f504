"""SD3.5 Medium's two position-embedding options, with sd-scripts' semantics, on diffusers' ``SD3Transformer2DModel``.

The MMDiT adds a window of a fixed sin-cos table (``pos_embed_max_size``² patches) to the patch tokens; diffusers'
``PatchEmbed.cropped_pos_embed(height, width)`` takes the centred window. :func:`install_position_embedding`
replaces that method on the one ``PatchEmbed`` instance (the weights, the buffer and the saved files do not change):

- ``--pos_emb_random_crop_rate r``: while training, with probability ``r`` per forward call, the window is taken at a
  random position of the table instead of the centre (torch's global RNG, as sd-scripts: one ``rand`` draw, then the
  top and left offsets; restored on resume).
- ``--enable_scaled_pos_embed``: a table per dataset resolution. For a latent side ``s`` (``round(sqrt(w*h)) / 8``)
  the patch side is ``p = s / patch_size``; its table has ``G = int(1.5 p)`` positions a side whose coordinates are
  scaled so that the centred ``p x p`` window spans 16 units (the pretraining grid) whatever ``p`` is:
  ``16 * (i - (G - p) / 2) / p``. A forward call picks the table by the area of its patch grid: the smallest size
  whose area bound it is within (bounds halfway between consecutive squared sizes, the last one ``(1.5 p)²``), else
  the largest; a grid taller or wider than that table gets its own table of side ``max(h, w)`` (sd-scripts also
  registers it for later lookups, which makes the choice depend on the history of shapes; here it never does).
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any, Sequence

import torch

logger = logging.getLogger(__name__)

MAX_RATIO = 1.5  # a table's side is 1.5 times its resolution's patch side
BASE_GRID = 16  # the span of the centred window's coordinates


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 10000^(-2k/dim)``: shape ``(len(positions), dim)``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The 2-D table of row coordinates ``rows`` x column coordinates ``cols``, row-major: ``(H*W, dim)``; the first
    half of the channels encodes the column, the second the row (SD3's layout)."""
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, grid_cols), sincos_1d(dim // 2, grid_rows)], dim=1)


def scaled_table(dim: int, patch_side: int) -> torch.Tensor:
    """The scaled table of a resolution whose patch grid is ``patch_side`` a side: ``(1, G*G, dim)`` float32,
    ``G = int(1.5 * patch_side)``."""
    grid = int(patch_side * MAX_RATIO)
    coords = BASE_GRID * (torch.arange(grid, dtype=torch.float32) - (grid - patch_side) / 2) / patch_side
    return sincos_2d(dim, coords, coords).float().unsqueeze(0)


def latent_patch_sides(resolutions: Sequence[tuple[int, int]], *, vae_factor: int = 8,
                       patch_size: int = 2) -> list[int]:
    """sd-scripts' patch sides of the dataset resolutions ``(width, height)``: ``round(sqrt(w*h)) // 8 // patch``,
    without duplicates, ascending."""
    return sorted({round(math.sqrt(w * h)) // vae_factor // patch_size for w, h in resolutions})


class PositionEmbedding:
    """``PatchEmbed.cropped_pos_embed`` with the random crop and the scaled tables (see the module docstring).
    ``training`` is set by the recipe: the crop applies only to training steps, never to samples or validation."""

    def __init__(self, patch_embed: torch.nn.Module, *, crop_rate: float, scaled_sides: Sequence[int] = ()):
        self.patch_embed = patch_embed
        self.crop_rate = float(crop_rate)
        self.training = False
        dim = patch_embed.pos_embed.shape[-1]
        self.dim = dim
        sides = sorted(set(scaled_sides))
        self.tables = {side: scaled_table(dim, side) for side in sides}
        bounds = [(a * a + b * b) // 2 for a, b in zip(sides, sides[1:])]
        bounds += [int((sides[-1] * MAX_RATIO) ** 2)] if sides else []
        self.area_bounds = list(zip(bounds, sides))
        self._placed: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def scaled(self) -> bool:
        return bool(self.tables)

    def table_for(self, rows: int, cols: int) -> torch.Tensor:
        """The scaled table a ``rows x cols`` patch grid uses (CPU, float32)."""
        side = next((s for bound, s in self.area_bounds if rows * cols <= bound), self.area_bounds[-1][1])
        if max(rows, cols) > int(side * MAX_RATIO):
            side = max(rows, cols)
            if side not in self.tables:
                logger.warning("a %dx%d patch grid is taller or wider than the scaled position embeddings of the "
                               "dataset resolutions; using one made for %d patches a side", rows, cols, side)
                self.tables[side] = scaled_table(self.dim, side)
        return self.tables[side]

    def _draw_offsets(self, grid: int, rows: int, cols: int) -> tuple[int, int]:
        if self.training and self.crop_rate > 0 and torch.rand(1).item() < self.crop_rate:
            top = int(torch.randint(0, grid - rows + 1, (1,)).item())
            return top, int(torch.randint(0, grid - cols + 1, (1,)).item())
        return (grid - rows) // 2, (grid - cols) // 2

    def __call__(self, height: int, width: int) -> torch.Tensor:
        """The position embedding of a latent of ``height x width``: ``(1, rows*cols, dim)``."""
        patch = self.patch_embed.patch_size
        rows, cols = height // patch, width // patch
        buffer = self.patch_embed.pos_embed
        if self.scaled:
            table = self.table_for(rows, cols)
            key = (id(table), buffer.device, buffer.dtype)
            if key not in self._placed:
                self._placed[key] = table.to(buffer.device, buffer.dtype)
            table = self._placed[key]
        else:
            table = buffer
            max_size = self.patch_embed.pos_embed_max_size
            if rows > max_size or cols > max_size:
                raise ValueError(f"a {rows}x{cols} patch grid exceeds the model's {max_size}x{max_size} position "
                                 "embedding; train at a lower resolution")
        grid = math.isqrt(table.shape[1])
        top, left = self._draw_offsets(grid, rows, cols)
        window = table.reshape(1, grid, grid, -1)[:, top:top + rows, left:left + cols, :]
        return window.reshape(1, rows * cols, -1)


def oversized_bucket_problems(params: Any, max_side: int, model: str) -> list[str]:
    """One problem per dataset whose images or buckets can be larger than ``max_side`` pixels on a side (the
    position table's patches times the patch size times the VAE factor)."""
    problems = []
    for ds in params.datasets:
        width, height = ds.resolution
        side = max(width, height)
        if ds.enable_bucket:  # a bucket keeps the area of the resolution, its sides within min/max_bucket_reso
            side = max(side, min(ds.max_bucket_reso, width * height // max(ds.min_bucket_reso, 1)))
        if side > max_side:
            where = "max_bucket_reso" if ds.enable_bucket and ds.max_bucket_reso > max_side else "resolution"
            problems.append(f"{ds.origin}: images up to {side} px on a side, but this {model} model's position "
                            f"embedding covers at most {max_side} px; lower {where} to {max_side} or less")
    return problems


def install_position_embedding(transformer: torch.nn.Module, *, crop_rate: float,
                               scaled_sides: Sequence[int] = ()) -> PositionEmbedding:
    """Replace ``transformer.pos_embed.cropped_pos_embed`` by a :class:`PositionEmbedding`; returns it."""
    patch_embed = transformer.pos_embed
    embedding = PositionEmbedding(patch_embed, crop_rate=crop_rate, scaled_sides=scaled_sides)
    patch_embed.cropped_pos_embed = embedding  # PatchEmbed.forward calls self.cropped_pos_embed(height, width)
    return embedding


def apply_position_options(transformer: torch.nn.Module, args: argparse.Namespace,
                           resolutions: Sequence[tuple[int, int]]) -> PositionEmbedding | None:
    """``--pos_emb_random_crop_rate`` / ``--enable_scaled_pos_embed`` on the loaded MMDiT (None when neither is
    given). ``resolutions`` are the datasets' ``(width, height)`` settings, as sd-scripts takes them."""
    from accelerate import PartialState

    rate = float(getattr(args, "pos_emb_random_crop_rate", 0.0) or 0.0)
    scaled = bool(getattr(args, "enable_scaled_pos_embed", False))
    if not rate and not scaled:
        return None
    sides = latent_patch_sides(resolutions, patch_size=transformer.config.patch_size) if scaled else []
    if PartialState().is_main_process:
        what = [f"random crop rate {rate:g}"] if rate else []
        what += [f"scaled tables for {', '.join(f'{s}x{s}' for s in sides)} patches"] if scaled else []
        print(f"SD3.5 Medium position embedding: {'; '.join(what)}", flush=True)
    return install_position_embedding(transformer, crop_rate=rate, scaled_sides=sides)


def dataset_resolutions(group: Any) -> list[tuple[int, int]]:
    """The ``(width, height)`` resolution settings of a dataset group's training and validation datasets."""
    return [tuple(ds.params.resolution) for ds in group.datasets() + group.datasets(validation=True)]
