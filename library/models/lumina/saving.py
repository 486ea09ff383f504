"""Whole Lumina models out: the transformer in the Next-DiT single-file layout that sd-scripts and ComfyUI load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from library.models.lumina.conversion import diffusers_to_nextdit


def save_lumina_transformer(path: str | Path, transformer: Any, *, dtype: torch.dtype | None,
                            metadata: dict[str, str] | None, mem_eff: bool = False) -> Path:
    """Write ``transformer`` (diffusers ``Lumina2Transformer2DModel``) atomically as a single file in ``dtype``;
    ``mem_eff`` (``--mem_eff_save``) writes one tensor at a time (``library.models.safetensors_stream``; such files
    carry no ``sshs_*`` hashes, which need the whole file first)."""
    from library.models.metadata import save_safetensors
    from library.models.safetensors_stream import save_safetensors_streaming

    state = diffusers_to_nextdit(getattr(transformer, "module", transformer).state_dict())

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    if mem_eff:
        shapes = {k: (v.shape, dtype if dtype is not None and v.is_floating_point() else v.dtype)
                  for k, v in state.items()}
        save_safetensors_streaming(path, {k: (lambda v=v: cast(v)) for k, v in state.items()}, shapes, metadata)
        return Path(path)
    save_safetensors(path, {k: cast(v) for k, v in state.items()}, metadata)
    return Path(path)
