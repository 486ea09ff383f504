"""The family registry: every family the toolkit trains, and the one resolution of a run's family.

Adding a family: write its :class:`~library.models.families.base.FamilySpec` (a module next to ``sd.py``)
and add it to :data:`FAMILY_SPECS` (before any family whose checks would also accept its checkpoints).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import MappingProxyType
from typing import Collection, Mapping, Sequence

import torch

from library.errors import UserError
from library.models.families.base import FamilySpec, ModelFamily
from library.models.families.flux import FluxSpec
from library.models.families.lumina import LuminaSpec
from library.models.families.sd import SDSpec
from library.models.families.sd3 import SD3Spec
from library.models.families.sdxl import SDXLSpec

FAMILY_SPECS: Mapping[str, FamilySpec] = MappingProxyType(
    {spec.name: spec for spec in (SDXLSpec(), SD3Spec(), FluxSpec(), LuminaSpec(), SDSpec())})


def family_spec(name: str) -> FamilySpec:
    """The registered spec called ``name``."""
    try:
        return FAMILY_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model family spec {name!r}; known: {', '.join(FAMILY_SPECS)}") from None


def spec_for_denoiser(denoiser: torch.nn.Module) -> FamilySpec:
    """The spec of a loaded denoiser (the first that owns it; SD for anything unknown)."""
    for spec in FAMILY_SPECS.values():
        if spec.owns_denoiser(denoiser):
            return spec
    return FAMILY_SPECS["sd"]


def _header_keys(source: Path) -> Collection[str] | None:
    """Tensor names of a ``.safetensors`` file (header only); None for folders and pickles, whose family
    the loader checks while reading them."""
    from library.models.weights import safetensors_keys

    if source.is_file() and source.suffix.lower() == ".safetensors":
        return safetensors_keys(source)
    return None


def recognised_spec(source: Path) -> FamilySpec | None:
    """The spec that recognises this checkpoint file (header only) or model folder; None if none does."""
    return _recognised(source, _header_keys(source))


def _recognised(source: Path, keys: Collection[str] | None) -> FamilySpec | None:
    for spec in FAMILY_SPECS.values():
        if (spec.recognises_folder(source) if source.is_dir() else keys is not None and spec.recognises_file(keys)):
            return spec
    return None


def resolve_family(args: argparse.Namespace, trains: Sequence[str] = ("sd",), source: Path | None = None
                   ) -> ModelFamily:
    """The run's family, from ``--pretrained_model_name_or_path`` (header or folder only) and the flags,
    before any model loads. ``trains`` names the specs the calling script trains; a checkpoint of another
    family is refused with the script to use instead."""
    from library.models.loading import resolve_model_path

    source = source or resolve_model_path(getattr(args, "pretrained_model_name_or_path", None))
    keys = _header_keys(source)
    found = _recognised(source, keys)
    if found is not None and found.name not in trains:
        scripts = " or ".join(found.scripts)
        raise UserError(f"{source}: this is a model of the {found.name.upper()} family, which this script does not train; "
                        f"use {scripts}")
    return (found or family_spec(trains[0])).family(args, source, keys)
