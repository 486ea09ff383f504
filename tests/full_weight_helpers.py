"""Helpers for the train_db.py / fine_tune.py tests: saved models' weights in the single-file layout."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

UNET, TE = "model.diffusion_model.", "cond_stage_model."


def ldm_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a saved single-file model (or our loader's view of a folder, in the same layout)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".ckpt":
        return torch.load(path, weights_only=True)["state_dict"]
    from library.models.loading import load_sd_models
    from library.models.saving import ldm_state_dict

    return ldm_state_dict(load_sd_models(argparse.Namespace(pretrained_model_name_or_path=str(path))))


def part(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` (``UNET`` or ``TE``), as float32."""
    return {k: v.float() for k, v in weights.items() if k.startswith(prefix)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bitwise equal (the key sets must match and not be empty)."""
    assert a.keys() == b.keys() and a
    return all(torch.equal(a[k], b[k]) for k in a)
