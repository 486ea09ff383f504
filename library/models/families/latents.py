"""Which family a latent cache made ahead of training is for (``finetune/prepare_buckets_latents.py``).

A whole checkpoint or model folder names its family (the registry recognises it); a VAE file given alone does not
(SD1.x and SDXL VAEs have the same layout, FLUX.1 and Lumina share one AE), so each family that can be named that
way has a :class:`~library.models.families.base.LatentFlag` (``--sdxl``, ``--flux``, ``--lumina``); without one a
VAE is the default family's. The spec then says which :class:`ModelFamily` the latents are for
(:meth:`FamilySpec.latent_family`: cache-file suffix, bucket step, default resolution) and loads the VAE
(:meth:`FamilySpec.load_latent_vae`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from library.errors import UserError
from library.models.families.base import FamilySpec, LatentFlag, ModelFamily
from library.models.families.registry import FAMILY_SPECS, recognised_spec

#: the family of a VAE given without a flag
DEFAULT_LATENT_SPEC = "sd"


def latent_flags() -> list[tuple[FamilySpec, LatentFlag]]:
    """Every family flag of ``prepare_buckets_latents.py``, in registry order."""
    return [(spec, spec.latent_flag) for spec in FAMILY_SPECS.values() if spec.latent_flag is not None]


def add_latent_flags(parser: argparse.ArgumentParser) -> None:
    """One ``store_true`` option per family flag."""
    for _, flag in latent_flags():
        parser.add_argument(flag.option, action="store_true", help=flag.help)


def latent_channels(source: Path) -> int | None:
    """The latent channels of a VAE/AE file, from its header (None when not a safetensors VAE)."""
    if not source.is_file() or source.suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(source), "pt") as f:
        for name in ("encoder.conv_out.weight", "first_stage_model.encoder.conv_out.weight"):
            if name in f.keys():
                return int(f.get_slice(name).get_shape()[0]) // 2
    return None


def _flagged(args: argparse.Namespace) -> tuple[FamilySpec, LatentFlag] | None:
    given = [(spec, flag) for spec, flag in latent_flags() if getattr(args, flag.dest, False)]
    if len(given) > 1:
        raise UserError(f"{' and '.join(flag.option for _, flag in given)} name different model families; give "
                        "the one whose training reads these latents")
    return given[0] if given else None


def latent_family(args: argparse.Namespace, source: Path) -> ModelFamily:
    """The family whose training reads the latents made from ``source`` (see the module docstring); a
    :class:`UserError` when the flags and the file disagree. Reads headers and configs only."""
    flagged = _flagged(args)
    recognised = recognised_spec(source) if source.exists() else None
    if recognised is not None:
        family = recognised.latent_family(source, args, recognised=True)
        if flagged is not None and flagged[0] is not recognised:
            raise UserError(f"{source} is a model of the {recognised.name.upper()} family (recognised from the file): "
                            f"remove {flagged[1].option}, which names a {flagged[1].title} VAE given alone")
        return family
    channels = latent_channels(source)
    if channels is None and source.is_file() and source.suffix.lower() == ".safetensors":
        raise UserError(f"{source}: no VAE weights found (expected encoder.*/decoder.* or first_stage_model.*); give a "
                        "whole model, or the VAE / AE file its training uses")
    if flagged is not None:
        spec, flag = flagged
        if channels not in (None, spec.latent_channels):
            raise UserError(f"{flag.option}: {source} is a VAE with {channels} latent channels, not the "
                            f"{spec.latent_channels}-channel one of {flag.title}; give the VAE {flag.title} "
                            "training uses")
        return spec.latent_family(source, args, recognised=False)
    default = FAMILY_SPECS[DEFAULT_LATENT_SPEC]
    if channels is not None and channels != default.latent_channels:
        options = [f"{flag.option} ({flag.title} training)" for spec, flag in latent_flags()
                   if spec.latent_channels == channels]
        if not options:
            raise UserError(f"{source} is a VAE with {channels} latent channels, which no model family here uses")
        raise UserError(f"{source} is a {channels}-channel autoencoder given alone; add {' or '.join(options)} so "
                        "that the latents are named for the training that reads them")
    return default.latent_family(source, args, recognised=False)
