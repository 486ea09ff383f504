"""Output rules and metadata shared by the LoRA tools: never overwrite without ``--overwrite``, never write over
an input, and ``ss_*`` / ``modelspec.*`` metadata in sd-scripts' keys."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable, Mapping

import torch

from library.errors import UserError
from library.io_utils import output_dir_problem
from library.lora_tools.lora_file import LORA_SUFFIXES, LoRAFile, LoRAModuleWeights, dims_metadata
from library.models.families import ModelFamily
from library.models.metadata import IMPL_DIFFUSERS, modelspec
from library.precision import dtype_of


def precision_dtype(name: str | None) -> torch.dtype | None:
    """``float`` / ``fp16`` / ``bf16`` as a dtype (None stays None)."""
    return dtype_of(name)


def check_output(
    save_to: str | os.PathLike | None,
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike] = (),
    lora: bool = True,
) -> Path:
    """The output path, checked before anything loads: given, a LoRA suffix (for LoRA outputs), not one of the
    inputs, and not an existing file or folder unless ``overwrite``."""
    if not save_to:
        raise UserError("--save_to is required: the file to write (e.g. --save_to merged.safetensors)")
    path = Path(save_to).expanduser()
    if lora and path.suffix.lower() not in LORA_SUFFIXES:
        raise UserError(f"--save_to {path}: a LoRA file must end with .safetensors (recommended), .ckpt or .pt")
    for source in inputs:
        if Path(source).expanduser().resolve() == path.resolve():
            raise UserError(f"--save_to {path} is also an input; write the result to another file")
    if lora and path.is_dir():
        raise UserError(f"--save_to {path} is a folder; give a LoRA file name (e.g. {path / 'merged.safetensors'})")
    problem = output_dir_problem(path.parent, "--save_to: the folder of the output,")
    if problem:
        raise UserError(problem)
    if path.exists() and not overwrite:
        raise UserError(f"--save_to {path} already exists; nothing was written. Pass --overwrite to replace it")
    return path


def check_ratios(models: list[str], ratios: list[float] | None) -> list[float]:
    """One ratio per model (all 1.0 when ``--ratios`` is not given)."""
    if not models:
        raise UserError("--models is required: one or more LoRA files")
    if ratios is None:
        return [1.0] * len(models)
    if len(ratios) != len(models):
        raise UserError(
            f"--ratios has {len(ratios)} values for {len(models)} --models; give one ratio per LoRA file"
        )
    return list(ratios)


def lora_model_family(family_name: str | None, metadata: Mapping[str, str],
                      modules: Mapping[str, LoRAModuleWeights] | None = None) -> ModelFamily | None:
    """The model family of a LoRA (its ``LORA_FAMILIES`` row reads it from the modules and metadata: SD2,
    v-prediction, FLUX dev or schnell, the SD3 variant), None for a file of no known family."""
    from library.lora_tools.targets import lora_family_row

    row = lora_family_row(family_name)
    return row.model(modules or {}, metadata) if row is not None else None


def network_module_of(family_name: str | None) -> str:
    """``ss_network_module`` of a LoRA family's files."""
    from library.lora_tools.targets import lora_family_row

    row = lora_family_row(family_name)
    return row.network_module if row is not None else "networks.lora"


def network_args_metadata(modules: Mapping[str, LoRAModuleWeights]) -> dict[str, str]:
    """``ss_network_args`` with ``conv_dim``/``conv_alpha`` when the file has 3x3 (LoCon) modules of one rank."""
    conv = [m for m in modules.values() if m.is_3x3]
    ranks, alphas = {m.rank for m in conv}, {m.alpha for m in conv}
    args = {"conv_dim": str(ranks.pop()), "conv_alpha": str(alphas.pop())} if len(ranks) == len(alphas) == 1 else {}
    return {"ss_network_args": json.dumps(args)}


def lora_metadata(
    modules: Mapping[str, LoRAModuleWeights],
    family: ModelFamily | None,
    *,
    title: str,
    base: Mapping[str, str] | None = None,
    merged_from: list[LoRAFile] | None = None,
    no_metadata: bool = False,
    network_module: str = "networks.lora",
) -> dict[str, str]:
    """Metadata of a LoRA the tools write: ``base`` (kept as it is) updated with the network module, dims,
    alphas, args and base model version, plus ``modelspec.*`` unless ``no_metadata``. Hashes are added on save."""
    meta = {k: v for k, v in (base or {}).items() if not k.startswith("sshs_")}
    meta["ss_network_module"] = network_module
    meta.update(dims_metadata(modules.values()))
    meta.update(network_args_metadata(modules))
    if family is not None:
        meta["ss_v2"] = str(family.ss_v2)
        meta["ss_base_model_version"] = family.base_model_version
        if not no_metadata:
            meta.update(
                modelspec(
                    f"{family.modelspec_architecture}/lora",
                    title=title,
                    resolution=family.default_resolution,
                    prediction_type=family.objective.modelspec_prediction_type,
                    timestamp=time.time(),
                    implementation=IMPL_DIFFUSERS,
                )
            )
    if merged_from and not no_metadata:
        meta["modelspec.merged_from"] = ", ".join(f.path.stem for f in merged_from)
    return meta
