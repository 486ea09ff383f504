"""Whole FLUX.1 transformers out (``flux_train.py``): one ``.safetensors`` file in the BFL layout
(``double_blocks.*``/``single_blocks.*``, fused ``qkv``/``linear1``), as sd-scripts writes and as the
``flux1-dev.safetensors`` people download, so our loader, ComfyUI and diffusers ``from_single_file`` read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from library.models.flux.conversion import FluxArchitecture, diffusers_to_bfl_lazy


def save_flux_transformer(path: str | Path, transformer: Any, *, dtype: torch.dtype | None,
                          metadata: dict[str, str] | None = None, mem_eff: bool = False) -> Path:
    """Write ``transformer`` (diffusers ``FluxTransformer2DModel``) to ``path`` in the BFL layout, cast to
    ``dtype`` (None keeps each tensor's dtype), atomically. ``mem_eff`` (``--mem_eff_save``) writes one tensor
    at a time instead of building the whole file in memory."""
    from safetensors.torch import save_file

    from library.io_utils import atomic_save_file
    from library.models.safetensors_stream import save_safetensors_streaming

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a FLUX model file must end with .safetensors")
    transformer = getattr(transformer, "module", transformer)
    arch = FluxArchitecture.from_diffusers_config(transformer.config)
    state = transformer.state_dict()
    lazy = diffusers_to_bfl_lazy(state, arch)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    if mem_eff:
        meta_state = {k: torch.empty_like(v, device="meta") for k, v in state.items()}
        shapes = {k: (make().shape, cast(make()).dtype) for k, make in diffusers_to_bfl_lazy(meta_state, arch).items()}
        save_safetensors_streaming(path, {k: (lambda make=make: cast(make())) for k, make in lazy.items()}, shapes,
                                   metadata)
        return path
    tensors = {k: cast(make()).detach().to("cpu").contiguous() for k, make in lazy.items()}
    atomic_save_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or None))
    return path
