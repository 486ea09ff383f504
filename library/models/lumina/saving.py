"""Whole Lumina models out: the transformer in the Next-DiT single-file layout that sd-scripts and ComfyUI load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from library.models.lumina.conversion import diffusers_to_nextdit


def save_lumina_transformer(path: str | Path, transformer: Any, *, dtype: torch.dtype | None,
                            metadata: dict[str, str] | None, mem_eff: bool = False) -> Path:
    """Write ``transformer`` (diffusers ``Lumina2Transformer2DModel``) atomically as a single file in ``dtype``;
    ``mem_eff`` writes one tensor at a time (``library.models.mem_eff_save``, no ``sshs_*`` hashes)."""
    from library.models.mem_eff_save import mem_eff_save_file
    from library.models.metadata import save_safetensors

    state = diffusers_to_nextdit(transformer.state_dict())
    if mem_eff:
        mem_eff_save_file(path, state, dtype=dtype, metadata=metadata)
        return Path(path)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_safetensors(path, state, metadata)
    return Path(path)
