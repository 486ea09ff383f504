"""Precision names (``--mixed_precision``, ``--save_precision``, ``fp32``) and their torch dtypes: the one map."""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

import torch

DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    "no": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "fp16": torch.float16, "bf16": torch.bfloat16,
})


def dtype_of(name: str | None, default: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype of a precision name; ``default`` for None or an unknown name."""
    return DTYPES.get(name or "", default)
