"""Safetensors metadata shared by everything that writes LoRA-style files.

The hashes and ``modelspec.*`` keys follow what kohya-ss/sd-scripts writes, because tools that index LoRA files
(sd-webui-additional-networks, A1111, Civitai) read them:

- ``sshs_model_hash``: sha256 of the tensor data section (everything after the 8-byte header length and the JSON
  header) of the file serialized in memory with only the ``ss_*`` metadata. The data section does not depend on the
  metadata, so it equals the sha256 of the data section of the file on disk.
- ``sshs_legacy_hash``: first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB of that in-memory file.
- Base models: ``ss_sd_model_hash`` is the same 64 KiB-at-1 MiB hash of the checkpoint file, ``ss_new_sd_model_hash``
  the sha256 of the whole file (:func:`file_hashes`).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import time
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping

import torch
from tqdm import tqdm

from library.io_utils import atomic_write_bytes

MODELSPEC_VERSION = "1.0.1"
IMPL_DIFFUSERS = "diffusers"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"

# Keys kept by --no_metadata (the reference's SS_METADATA_MINIMUM_KEYS); modelspec.* keys are kept as well.
MINIMUM_METADATA_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)

_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000
_CHUNK = 1024 * 1024


def _legacy_hash(f: BinaryIO) -> str:
    f.seek(_LEGACY_OFFSET)
    return hashlib.sha256(f.read(_LEGACY_LENGTH)).hexdigest()[:8]


def _sha256_from(f: BinaryIO, offset: int, total: int | None = None, desc: str | None = None) -> str:
    h = hashlib.sha256()
    f.seek(offset)
    show = total is not None and total > 256 * _CHUNK
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not show, leave=False) as bar:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def model_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` of ``tensors`` saved with the ``ss_*`` part of ``metadata``."""
    from safetensors.torch import save

    ss_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    buffer = BytesIO(save(dict(tensors), ss_only))
    header_len = int.from_bytes(buffer.read(8), "little")
    return _sha256_from(buffer, 8 + header_len), _legacy_hash(buffer)


def file_hashes(path: str | os.PathLike) -> tuple[str, str]:
    """``(legacy, sha256)`` of a base-model file: the A1111 "old" 8-hex hash and the sha256 of the whole file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file_hashes needs a file, got {path}")
    with open(path, "rb") as f:
        legacy = _legacy_hash(f)
        full = _sha256_from(f, 0, path.stat().st_size, desc=f"hashing {path.name}")
    return legacy, full


def minimum_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """What ``--no_metadata`` keeps: the keys needed to apply the file (network module, dim, alpha, base model
    version and network args) plus the ``modelspec.*`` keys."""
    return {k: v for k, v in metadata.items() if k in MINIMUM_METADATA_KEYS or k.startswith("modelspec.")}


def modelspec(
    architecture: str,
    *,
    title: str,
    resolution: int | tuple[int, int] | str,
    prediction_type: str = "epsilon",
    timestamp: float | None = None,
    implementation: str = IMPL_DIFFUSERS,
    encoder_layer: int | None = None,
    timestep_range: tuple[int, int] | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | Iterable[str] | None = None,
    implementation_version: str | None = None,
) -> dict[str, str]:
    """``modelspec.*`` keys (SAI ModelSpec 1.0.1), e.g. ``architecture="stable-diffusion-v1/lora"``.

    ``resolution`` is an int, ``(w, h)`` or a ``"w,h"`` string; ``prediction_type`` is ``epsilon`` or ``v``;
    ``encoder_layer`` is the clip skip; the date is the local time of ``timestamp`` (default now) without
    microseconds, as the reference writes it. Optional fields that are None are left out.
    """
    if isinstance(resolution, str):
        parts = tuple(int(p) for p in resolution.split(","))
        resolution = (parts[0], parts[-1])
    elif isinstance(resolution, int):
        resolution = (resolution, resolution)
    if timestamp is None:
        timestamp = time.time()
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": prediction_type,
    }
    optional = {
        "modelspec.author": author,
        "modelspec.description": description,
        "modelspec.license": license,
        "modelspec.tags": tags if tags is None or isinstance(tags, str) else ",".join(tags),
        "modelspec.implementation_version": implementation_version,
        "modelspec.encoder_layer": None if encoder_layer is None else str(encoder_layer),
        "modelspec.timestep_range": None if timestep_range is None else f"{timestep_range[0]},{timestep_range[1]}",
    }
    spec.update({k: v for k, v in optional.items() if v is not None})
    return spec


def run_modelspec(family: Any, args: Any, *, title: str, resolution: Any, lora: bool) -> dict[str, str]:
    """The ``modelspec.*`` keys of a training run's saved files, LoRA (``<architecture>/lora``, diffusers
    implementation) or whole checkpoint (as sd-scripts marks it: Stability AI's implementation). ``family``
    is the run's :class:`~library.models.families.ModelFamily`; the ``--metadata_*`` options fill the rest."""
    return modelspec(
        f"{family.modelspec_architecture}/lora" if lora else family.modelspec_architecture,
        title=args.metadata_title or title, resolution=resolution,
        prediction_type=family.objective.modelspec_prediction_type, encoder_layer=args.clip_skip,
        author=args.metadata_author, description=args.metadata_description, license=args.metadata_license,
        tags=args.metadata_tags, implementation=IMPL_DIFFUSERS if lora else IMPL_STABILITY_AI,
    )


def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None,
    *,
    minimal: bool = False,
) -> dict[str, str]:
    """Write ``tensors`` atomically with ``metadata`` plus ``sshs_model_hash``/``sshs_legacy_hash``.

    ``minimal=True`` (``--no_metadata``) keeps only :data:`MINIMUM_METADATA_KEYS` and ``modelspec.*``. The hashes
    are always added, as the reference does. Values must be strings. Returns the metadata written.
    """
    from safetensors.torch import save

    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings; not strings: {', '.join(sorted(bad))}")
    if minimal:
        meta = minimum_metadata(meta)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hashes(tensors, meta)
    atomic_write_bytes(path, save(tensors, meta))
    return meta
