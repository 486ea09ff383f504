"""``--mem_eff_save``: write a ``.safetensors`` file one tensor at a time.

``safetensors.torch.save`` builds the whole file in memory (and ``save_file`` a full CPU copy of every tensor),
which doubles the peak memory of a multi-gigabyte checkpoint. Here the header is computed from dtypes and
shapes alone, then each tensor is moved to the CPU, cast, written and dropped before the next, through a hidden
temporary renamed into place (``library.io_utils.atomic_save_file``). The file is byte-compatible with
safetensors' loader. Unlike the normal save it carries no ``sshs_*`` hashes (they need the whole file first).
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import torch

from library.io_utils import atomic_save_file

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def _header(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None, metadata: Mapping[str, str] | None
            ) -> tuple[bytes, list[tuple[str, torch.dtype]]]:
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    order = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        size = tensor.numel() * torch.empty((), dtype=target).element_size()
        header[name] = {"dtype": _DTYPES[target], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        order.append((name, target))
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, order


def mem_eff_save_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *,
                      dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (floating ones cast to ``dtype`` when given) with string ``metadata``, one at a time."""
    head, order = _header(tensors, dtype, metadata)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(head)
            for name, target in order:
                tensor = tensors[name].detach().to("cpu", target).contiguous()
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
                del tensor

    atomic_save_file(path, write)
