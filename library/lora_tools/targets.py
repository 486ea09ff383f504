"""Where a LoRA meets a model family: which family a LoRA file is for, and a loaded checkpoint's LoRA targets.

The tools never branch on a family. What differs per family sits behind two seams:

- :data:`LORA_FAMILIES` (here): how a family's LoRA module names look (to tell which family a file is for), the
  network module that loads its files, and (``library.lora_tools.references``) its full-size model on the
  ``meta`` device for the loader checks;
- the family's ``FamilySpec`` (``library.models.families``): reading, loading and saving its checkpoints for the
  tools (``lora_family``, ``load_for_lora``, ``save_for_lora``, ``lora_save_formats``) and the modules a LoRA
  file changes (``lora_targets``). :class:`ModelForLoRA` is a checkpoint loaded that way.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import torch
from torch import nn

from library.errors import UserError
from library.lora_tools import block_weights as bw
from library.lora_tools import references
from library.lora_tools.block_weights import BlockLayout
from library.lora_tools.lora_file import LoRAModuleWeights
from library.lora_tools.stored import StoredCheckpoint, TensorSlot
from library.models.families import FAMILY_SPECS, ModelFamily, sd_family, sdxl_family


def _sd2(modules: Mapping[str, LoRAModuleWeights], metadata: Mapping[str, str]) -> bool:
    """SD1 and SD2 share their names. SD2 projects in and out of its transformers with Linear layers (SD1: 1x1
    convs); without those modules the cross-attention / text encoder width (768 vs 1024) tells them apart."""
    for name, m in modules.items():
        if name.endswith(("_proj_in", "_proj_out")):
            return not m.is_conv
    for name, m in modules.items():
        if name.endswith(("attn2_to_k", "attn2_to_v")) or name.startswith("lora_te_"):
            return m.down.shape[1] == 1024
    return metadata.get("ss_v2") == "True"


def _v_prediction(metadata: Mapping[str, str]) -> bool:
    return metadata.get("modelspec.prediction_type") == "v" or metadata.get("ss_base_model_version", "").endswith("_v")


def _sd_version(modules: Mapping[str, LoRAModuleWeights], metadata: Mapping[str, str]) -> str:
    return "sd2" if _sd2(modules, metadata) else "sd1"


def _sd_model(modules: Mapping[str, LoRAModuleWeights], metadata: Mapping[str, str]) -> ModelFamily:
    return sd_family(_sd2(modules, metadata), _v_prediction(metadata))


def _sdxl_model(modules: Mapping[str, LoRAModuleWeights], metadata: Mapping[str, str]) -> ModelFamily:
    return sdxl_family(_v_prediction(metadata))


def _flux_model(modules: Mapping[str, LoRAModuleWeights], metadata: Mapping[str, str]) -> ModelFamily:
    """schnell from the metadata when no guidance embedder module says dev; dev when neither says."""
    from library.models.families.flux import flux_family

    schnell = "schnell" in metadata.get("modelspec.architecture", "") and not any("guidance_in" in n for n in modules)
    return flux_family("schnell" if schnell else "dev")


def _sd3_model(modules: Mapping[str, LoRAModuleWeights], metadata: Mapping[str, str]) -> ModelFamily:
    """The variant from the metadata (``ss_base_model_version``), else from the modules: dual-attention ``attn2``
    layers are SD3.5 Medium, more than 24 joint blocks SD3.5 Large, otherwise SD3 Medium."""
    from library.models.families.sd3 import VARIANTS, sd3_family

    version = metadata.get("ss_base_model_version", "")
    if version in VARIANTS:
        return sd3_family(version)
    if any("_x_block_attn2_" in n for n in modules):
        return sd3_family("5-medium")
    blocks = [int(m.group(1)) for n in modules if (m := re.match(r"lora_unet_joint_blocks_(\d+)_", n))]
    return sd3_family("5-large" if max(blocks, default=0) >= 24 else "medium")


def _lumina_model(modules: Mapping[str, LoRAModuleWeights], metadata: Mapping[str, str]) -> ModelFamily:
    from library.models.families.lumina import lumina_family

    return lumina_family()


@dataclass(frozen=True)
class LoRAFamily:
    """How one family's LoRA names look. ``spec`` is the model family spec (``library.models.families``) that
    loads its checkpoints; ``refine`` splits families that share names (SD1/SD2); ``network_module`` loads its
    files (``--network_module`` / ``ss_network_module``); ``model`` is the ``ModelFamily`` of a file (from its
    modules and metadata: SD2, v-prediction, FLUX schnell, the SD3 variant); ``blocks`` the ``--lbws`` block
    layouts for the files' module names."""

    name: str
    label: str
    pattern: re.Pattern[str]
    spec: str
    model: Callable[[Mapping[str, LoRAModuleWeights], Mapping[str, str]], ModelFamily]
    refine: Callable[[Mapping[str, LoRAModuleWeights], Mapping[str, str]], str] | None = None
    network_module: str = "networks.lora"
    #: text encoder files merged beside a checkpoint (``--clip_l`` ... ``--clip_l_save_to``; stored.TEXT_ENCODER_FILES)
    text_encoder_files: tuple[str, ...] = ()
    blocks: Callable[[Collection[str]], list[BlockLayout]] | None = None
    #: full-size ``(text_encoders, denoiser)`` on ``meta`` for a family name, and the diffusers pipeline around them
    reference: Callable[[str], tuple[list[nn.Module], nn.Module]] | None = None
    pipeline: Callable[[list[nn.Module], nn.Module], Any] | None = None


#: in the order files are matched: SD3 before FLUX (both may have T5 modules, ``lora_te3_``)
LORA_FAMILIES: tuple[LoRAFamily, ...] = (
    LoRAFamily("sd3", "SD3/3.5", re.compile(r"^lora_unet_joint_blocks_"), "sd3", _sd3_model,
               network_module="networks.lora_sd3", blocks=bw.SD3_BLOCKS.layouts, reference=references.sd3_reference,
               pipeline=references.sd3_pipeline),
    LoRAFamily("flux", "FLUX.1", re.compile(r"^lora_unet_(double|single)_blocks_|^lora_te3_"), "flux", _flux_model,
               network_module="networks.lora_flux", text_encoder_files=("clip_l", "t5xxl"),
               blocks=bw.FLUX_BLOCKS.layouts, reference=references.flux_reference, pipeline=references.flux_pipeline),
    LoRAFamily("lumina", "Lumina-2", re.compile(r"^lora_unet_(layers|noise_refiner|context_refiner)_\d+_"), "lumina",
               _lumina_model, network_module="networks.lora_lumina", blocks=bw.LUMINA_BLOCKS.layouts,
               reference=references.lumina_reference, pipeline=references.lumina_pipeline),
    LoRAFamily("sdxl", "SDXL", re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_|^lora_te2_"), "sdxl",
               _sdxl_model, blocks=bw.fixed(bw.SDXL_LAYOUT), reference=references.sdxl_reference,
               pipeline=references.sdxl_pipeline),
    LoRAFamily("sd", "SD1.x/2.x", re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks)_|^lora_te_"), "sd",
               _sd_model, _sd_version, blocks=bw.fixed(bw.SD_LAYOUT), reference=references.sd_reference,
               pipeline=references.sd_pipeline),
)
FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", **{f.name: f.label for f in LORA_FAMILIES},
                 "flux1-dev": "FLUX.1", "flux1-schnell": "FLUX.1", "sd3-medium": "SD3 Medium",
                 "sd3-5-medium": "SD3.5 Medium", "sd3-5-large": "SD3.5 Large", "lumina2": "Lumina-2"}


def lora_family(modules: Mapping[str, LoRAModuleWeights], metadata: Mapping[str, str]) -> str | None:
    """The family a LoRA file is for (``sd1``, ``sd2``, ``sdxl``, ``flux``, ``sd3``, ``lumina``), None if unknown."""
    for family in LORA_FAMILIES:
        if any(family.pattern.search(name) for name in modules):
            return family.refine(modules, metadata) if family.refine else family.name
    return None


def lora_family_row(name: str | None) -> LoRAFamily | None:
    """The :data:`LORA_FAMILIES` row of a LoRA family name (``sd1``/``sd2`` share the ``sd`` row)."""
    base = {"sd1": "sd", "sd2": "sd"}.get(name or "", name)
    return next((f for f in LORA_FAMILIES if f.name == base), None)


def row_of_model(model: ModelFamily) -> LoRAFamily | None:
    """The :data:`LORA_FAMILIES` row of a checkpoint's family."""
    return next((f for f in LORA_FAMILIES if f.spec == model.spec_name), None)


def family_label(name: str | None) -> str:
    return FAMILY_LABELS.get(name or "", "unknown")


def same_family(lora_name: str | None, model: ModelFamily) -> bool:
    """Whether a LoRA of family ``lora_name`` is for checkpoints of ``model``: the same spec, and for a row whose
    files are told apart by ``refine`` (SD1/SD2) the same family name too."""
    row = lora_family_row(lora_name)
    if row is None or row.spec != model.spec_name:
        return False
    return row.refine is None or lora_name == model.name


def models_supported(name: str | None) -> bool:
    """Whether this toolkit can load checkpoints of this LoRA family yet (its spec is registered)."""
    row = lora_family_row(name)
    return row is not None and row.spec in FAMILY_SPECS


# ----------------------------------------------------------------------------------------------- models


def fused_shape(parts: tuple[nn.Module, ...]) -> tuple[int, ...]:
    """Shape of the weight a LoRA module changes: its parts' weights stacked on rows."""
    first = tuple(parts[0].weight.shape)
    return (sum(int(p.weight.shape[0]) for p in parts), *first[1:])


def fused_weight(parts: tuple[nn.Module, ...], device: str | torch.device = "cpu") -> torch.Tensor:
    """The (fused) weight of a LoRA target in float32 on ``device``."""
    weights = [p.weight.to(device, torch.float32) for p in parts]
    return weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)


@torch.no_grad()
def store_weight(parts: tuple[nn.Module, ...], value: torch.Tensor) -> None:
    """Write a (fused) weight back into its parts, each in its own dtype and device (a checkpoint's stored tensor
    is replaced)."""
    start = 0
    for p in parts:
        rows = int(p.weight.shape[0])
        if isinstance(p, TensorSlot):
            p.store(value[start:start + rows])
        else:
            p.weight.copy_(value[start:start + rows].to(p.weight.device, p.weight.dtype))
        start += rows


@dataclass
class ModelForLoRA:
    """A checkpoint loaded for the LoRA tools through its family spec (``load_for_lora``)."""

    family: ModelFamily
    models: Any  # the spec's loaded components (``SDModels``)
    source: Path
    #: text encoder files changed beside the model, each with the path it is saved to
    extras: list[tuple[StoredCheckpoint, Path]] = field(default_factory=list)

    @property
    def family_name(self) -> str:
        return self.family.name

    def targets(self, conv_blocks: bool = True) -> dict[str, tuple[nn.Module, ...]]:
        """Every module a kohya LoRA can change, by its standard kohya name (see ``FamilySpec.lora_targets``), and
        those of the text encoder files given beside it."""
        found = self.family.spec.lora_targets(self.models, conv_blocks)
        for part, _ in self.extras:
            found.update(part.targets())
        return found

    def save(self, path: Path, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        """Write the (changed) model with its family's saver: ``.safetensors``/``.ckpt`` single file, or a
        diffusers folder for a path without a suffix."""
        fmt = output_model_format(path)
        self.family.spec.save_for_lora(path, self.models, fmt=fmt, dtype=dtype,
                                       metadata=metadata if fmt == "safetensors" else None)
        for part, save_to in self.extras:
            part.save(save_to, dtype, None)


def check_can_save(family: ModelFamily, path: Path) -> None:
    """Refuse (before any model loads) an output format the family's checkpoints cannot be written in."""
    formats = family.spec.lora_save_formats
    fmt = output_model_format(path)
    if not formats:
        raise UserError(f"merging into {family_label(family.name)} checkpoints is not supported by the LoRA tools "
                        "yet; merge the LoRAs into one LoRA instead (without --sd_model)")
    if fmt not in formats:
        kinds = {"safetensors": ".safetensors file", "ckpt": ".ckpt file",
                 "diffusers_safetensors": "diffusers folder (no suffix)"}
        raise UserError(f"--save_to {path}: a {family_label(family.name)} checkpoint is written as "
                        + " or ".join(kinds[f] for f in formats))


def output_model_format(path: Path) -> str:
    """``safetensors`` / ``ckpt`` by suffix; no suffix: a diffusers folder (safetensors weights)."""
    suffix = path.suffix.lower()
    formats = {".safetensors": "safetensors", ".ckpt": "ckpt", "": "diffusers_safetensors"}
    if suffix not in formats:
        raise UserError(
            f"--save_to {path}: unsupported model file type '{path.suffix}'; use .safetensors, .ckpt, or a folder "
            "name without a suffix for a diffusers folder"
        )
    return formats[suffix]


def _family_args(path: str | os.PathLike, family: ModelFamily | None, v_parameterization: bool) -> argparse.Namespace:
    """The loader's flags for a checkpoint whose family is read from the file (``--v2`` is what the file says)."""
    from library.models.loading import checkpoint_is_v2

    if family is not None:
        v2 = family.ss_v2
    else:
        try:
            v2 = checkpoint_is_v2(path)
        except UserError:  # not an SD1/SD2 checkpoint: another family's spec recognises it, or reports it
            v2 = False
    return argparse.Namespace(pretrained_model_name_or_path=str(path), v2=v2, v_parameterization=v_parameterization,
                              vae=None, tokenizer_cache_dir=None)


def checkpoint_family(path: str | os.PathLike, v_parameterization: bool | None = None) -> ModelFamily:
    """The family of a model file or diffusers folder, read from the file (header or configs) through the family
    registry. ``v_parameterization`` None: a diffusers folder's scheduler says it, a single file is epsilon."""
    from library.models.families.registry import FAMILY_SPECS, recognised_spec
    from library.models.loading import resolve_model_path
    from library.models.weights import safetensors_keys

    source = resolve_model_path(str(path))
    if v_parameterization is None:
        scheduler = source / "scheduler" / "scheduler_config.json"
        v_parameterization = scheduler.is_file() and '"v_prediction"' in scheduler.read_text(encoding="utf-8")
    args = _family_args(source, None, bool(v_parameterization))
    keys = safetensors_keys(source) if source.is_file() and source.suffix.lower() == ".safetensors" else None
    spec = recognised_spec(source) or FAMILY_SPECS["sd"]
    return spec.lora_family(args, source, keys)


def load_model_for_lora(path: str | os.PathLike, family: ModelFamily, *, dtype: torch.dtype = torch.float32
                        ) -> ModelForLoRA:
    """Load a checkpoint of ``family`` (see :func:`checkpoint_family`) on the CPU through its family spec.

    A single file carries no tokenizer; the CLIP tokenizer bundled with the toolkit (the same vocabulary and
    merges, SD2's padding for SD2) is used, so nothing is looked up online."""
    import tempfile

    from library.models.tiny import write_clip_tokenizer

    with tempfile.TemporaryDirectory(prefix="lora_tools_tokenizer_") as tmp:
        write_clip_tokenizer(Path(tmp) / "tokenizer", sd2=family.ss_v2)
        args = _family_args(path, family, family.objective.is_v_prediction)
        args.tokenizer_cache_dir = tmp
        models = family.spec.load_for_lora(args, family, dtype=dtype)
    return ModelForLoRA(family, models, Path(path))
