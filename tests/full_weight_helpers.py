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


def assert_diffusers_loads_the_same(path: Path, base_dir: Path) -> None:
    """diffusers loads ``path`` offline (a folder with from_pretrained, a single file with from_single_file and
    the base model's folder as config) into the UNet and text encoder our loader reads from it."""
    from diffusers import StableDiffusionPipeline

    from library.models.loading import load_sd_models

    if path.is_dir():
        pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, local_files_only=True)
    else:
        pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(base_dir), safety_checker=None,
                                                        local_files_only=True)
    ours = load_sd_models(argparse.Namespace(pretrained_model_name_or_path=str(path),
                                             tokenizer_cache_dir=str(base_dir)))
    for theirs, mine in ((pipe.unet, ours.unet), (pipe.text_encoder, ours.text_encoders[0])):
        a, b = theirs.state_dict(), mine.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)
