"""Shared fixtures: tiny models saved in real on-disk formats, and generated images."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Two pytest workers share two cores: one thread each (also for the scripts the tests start) avoids
# oversubscription, which makes small-model CPU runs many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory) -> Path:
    """A tiny SD1.x-shaped model saved as a diffusers folder (with tokenizer)."""
    from library.models.tiny import TinyConfig, save_tiny_diffusers_model

    return save_tiny_diffusers_model(tmp_path_factory.mktemp("tiny_sd1") / "model", TinyConfig(sd2=False))


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory) -> Path:
    """A tiny SD2.x-shaped model saved as a diffusers folder (with tokenizer)."""
    from library.models.tiny import TinyConfig, save_tiny_diffusers_model

    return save_tiny_diffusers_model(tmp_path_factory.mktemp("tiny_sd2") / "model", TinyConfig(sd2=True))


def make_image(path: Path, size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> Path:
    """Write a random-noise-plus-gradient image of ``size`` (w, h) to ``path`` (format from the suffix)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    channels = 4 if mode == "RGBA" else 3
    grad = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    arr = (rng.integers(0, 64, (h, w, channels)) + grad * 0.75).clip(0, 255).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)
    return path


@pytest.fixture
def image_factory():
    """``image_factory(path, (w, h), seed=0, mode="RGB")`` writes a generated image and returns its path."""
    return make_image


@pytest.fixture
def hide_module(monkeypatch):
    """``hide_module("bitsandbytes")``: the package (and its submodules) cannot be imported for the rest of the test,
    as if it were not installed (``import`` raises ImportError, ``importlib.util.find_spec`` returns None)."""

    def hide(name: str) -> None:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            monkeypatch.setitem(sys.modules, key, None)
        monkeypatch.setitem(sys.modules, name, None)

    return hide


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
