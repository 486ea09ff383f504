"""``--mem_eff_save``: write a safetensors file one tensor at a time.

``safetensors.torch.save_file`` needs every tensor on the CPU at once (plus its serialized copy), which for a
12B-parameter model is tens of GB of host memory. Here the header is written from the tensors' shapes, then
each tensor is produced, cast, copied to the CPU and written before the next one, so the host holds one tensor
at a time. The file is an ordinary safetensors file (``safetensors.safe_open`` reads it), written atomically.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Mapping

import torch

from library.io_utils import atomic_save_file

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def save_safetensors_streaming(path: str | os.PathLike, tensors: Mapping[str, Callable[[], torch.Tensor]],
                               shapes: Mapping[str, tuple[torch.Size, torch.dtype]],
                               metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> function producing the tensor, called once, in name order) whose shape and
    dtype are ``shapes[name]``; a produced tensor of another shape or dtype is a ``ValueError``."""
    names = sorted(tensors)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        shape, dtype = shapes[name]
        size = shape.numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in names:
                tensor = tensors[name]().detach()
                if tuple(tensor.shape) != tuple(shapes[name][0]) or tensor.dtype != shapes[name][1]:
                    raise ValueError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, header says "
                                     f"{tuple(shapes[name][0])} {shapes[name][1]}")
                data = tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(data.numpy().tobytes())
                del tensor, data

    atomic_save_file(path, write)
