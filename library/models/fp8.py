"""Weights stored in float8 (``--fp8_base``, ``--fp8_vl``): every ``nn.Linear`` weight of a frozen model is kept
as ``float8_e4m3fn`` (a quarter of float32's memory, half of bf16's) and up-cast to the input's dtype for each
call, so the computation runs in bf16/fp16/fp32. Norms, embeddings and biases keep their dtype.

Family-agnostic: FLUX, SD3, Lumina and the Qwen-VL captioner use the same pieces. PyTorch stores and casts
float8 on any device, so this works (and is tested) on CPU too.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
M = TypeVar("M", bound=torch.nn.Module)


class Fp8Linear(torch.nn.Linear):
    """A Linear whose weight is stored in float8 and up-cast to the input's dtype for each call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


def to_fp8(model: torch.nn.Module, skip: Callable[[str], bool] | None = None) -> int:
    """Store every Linear weight of ``model`` as float8_e4m3fn; returns how many were converted. Left as they
    are: a head tied to the embeddings, the modules whose name ``skip`` accepts, and those a transformers model
    keeps in float32 (``_keep_in_fp32_modules``: T5's ``wo``, which casts its input to its weight's dtype)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    count = 0
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or id(module.weight) in embeddings or (skip and skip(name)):
            continue
        if any(part in keep for part in name.split(".")):
            continue
        if module.weight.dtype != FP8_DTYPE:
            module.weight.data = module.weight.data.to(FP8_DTYPE)
        module.__class__ = Fp8Linear
        count += 1
    return count


def move_keeping_fp8(module: M, device: torch.device | str, dtype: torch.dtype | None) -> M:
    """``module.to(device, dtype)`` that leaves float8 tensors in float8 (they are storage, not compute)."""
    def convert(t: torch.Tensor) -> torch.Tensor:
        if t.dtype in FP8_DTYPES or dtype is None or not t.is_floating_point():
            return t.to(device)
        return t.to(device, dtype)

    return module._apply(convert)


def holds_fp8(module: torch.nn.Module) -> bool:
    return any(p.dtype in FP8_DTYPES for p in module.parameters())
