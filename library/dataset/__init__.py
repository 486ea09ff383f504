"""Datasets: image discovery, captions, buckets, transforms, batching and caches.

The trainer's entry points (``build_dataset_group``, ``DatasetGroup``, ``make_train_loader``,
``EpochLoader``, ``debug_dataset``) are importable from here; they load lazily so that light users of this
package (e.g. ``library.dataset.image_files`` in the preparation tools) do not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_dataset_group": "library.dataset.group",
    "DatasetGroup": "library.dataset.group",
    "make_train_loader": "library.dataset.loader",
    "EpochLoader": "library.dataset.loader",
    "debug_dataset": "library.dataset.debug",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'library.dataset' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
