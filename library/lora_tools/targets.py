"""Where a LoRA meets a model family: which family a LoRA file is for, and a loaded checkpoint's LoRA targets.

The tools never branch on a family. What differs per family sits in two places:

- :data:`LORA_FAMILIES`: how a family's LoRA module names look (to tell which family a file is for, and which
  families this toolkit can load models of yet);
- :class:`ModelForLoRA`: a loaded checkpoint as ``{kohya module name: nn.Linear/nn.Conv2d}`` plus its family
  and a ``save``; :func:`load_model_for_lora` builds it through the model loader, and
  :func:`reference_model` builds a full-size model on the ``meta`` device (names and shapes only, no memory).
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from types import MappingProxyType
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from library.errors import UserError
from library.lora_tools.lora_file import LoRAModuleWeights
from library.models.families import FAMILY_SPECS, ModelFamily, resolve_family


def _sd_version(modules: Mapping[str, LoRAModuleWeights], metadata: Mapping[str, str]) -> str:
    """SD1 and SD2 share their names. SD2 projects in and out of its transformers with Linear layers (SD1: 1x1
    convs); without those modules the cross-attention / text encoder width (768 vs 1024) tells them apart."""
    for name, m in modules.items():
        if name.endswith(("_proj_in", "_proj_out")):
            return "sd1" if m.is_conv else "sd2"
    for name, m in modules.items():
        if name.endswith(("attn2_to_k", "attn2_to_v")) or name.startswith("lora_te_"):
            return "sd2" if m.down.shape[1] == 1024 else "sd1"
    return "sd2" if metadata.get("ss_v2") == "True" else "sd1"


@dataclass(frozen=True)
class LoRAFamily:
    """How one family's LoRA names look. ``spec`` is the model family spec (``library.models.families``) that
    loads its checkpoints; ``refine`` splits families that share names (SD1/SD2)."""

    name: str
    label: str
    pattern: re.Pattern[str]
    spec: str
    refine: Callable[[Mapping[str, LoRAModuleWeights], Mapping[str, str]], str] | None = None


LORA_FAMILIES: tuple[LoRAFamily, ...] = (
    LoRAFamily("flux", "FLUX.1", re.compile(r"^lora_unet_(double|single)_blocks_"), "flux"),
    LoRAFamily("sd3", "SD3/3.5", re.compile(r"^lora_unet_joint_blocks_"), "sd3"),
    LoRAFamily("lumina", "Lumina-2", re.compile(r"^lora_unet_(layers|noise_refiner|context_refiner)_\d+_"), "lumina"),
    LoRAFamily("sdxl", "SDXL", re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_|^lora_te2_"), "sdxl"),
    LoRAFamily("sd", "SD1.x/2.x", re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks)_|^lora_te_"), "sd",
               _sd_version),
)
FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", **{f.name: f.label for f in LORA_FAMILIES}}


def lora_family(modules: Mapping[str, LoRAModuleWeights], metadata: Mapping[str, str]) -> str | None:
    """The family a LoRA file is for (``sd1``, ``sd2``, ``sdxl``, ``flux``, ``sd3``, ``lumina``), None if unknown."""
    for family in LORA_FAMILIES:
        if any(family.pattern.search(name) for name in modules):
            return family.refine(modules, metadata) if family.refine else family.name
    return None


def family_label(name: str | None) -> str:
    return FAMILY_LABELS.get(name or "", "unknown")


def models_supported(name: str | None) -> bool:
    """Whether this toolkit can load checkpoints of this LoRA family yet (its spec is registered)."""
    base = {"sd1": "sd", "sd2": "sd"}.get(name or "", name)
    return any(f.name == base and f.spec in FAMILY_SPECS for f in LORA_FAMILIES)


# ----------------------------------------------------------------------------------------------- models


@dataclass
class ModelForLoRA:
    """A loaded checkpoint seen by the LoRA tools."""

    family: ModelFamily
    models: Any  # the loader's result (SDModels for SD1/SD2)
    source: Path

    @property
    def family_name(self) -> str:
        return self.family.name

    def targets(self, conv_blocks: bool = True) -> dict[str, nn.Module]:
        """Every module a kohya LoRA can change, by its standard kohya name; ``conv_blocks`` includes the LoCon
        modules (ResNet and up/down-sampler blocks)."""
        from networks.lora import find_target_modules

        found = find_target_modules(self.models.text_encoders, self.models.denoiser, scan_conv_blocks=conv_blocks)
        return {t.lora_name: t.module for t in found}

    def save(self, path: Path, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        """Write the (changed) model with its family's saver: ``.safetensors``/``.ckpt`` single file, or a
        diffusers folder for a path without a suffix."""
        fmt = output_model_format(path)
        save = _saver(self.family.spec_name)
        save(path, self.models, fmt=fmt, dtype=dtype, metadata=metadata if fmt == "safetensors" else None)


def _save_sd(path: Path, models: Any, **kwargs: Any) -> None:
    from library.models.saving import save_sd_model

    save_sd_model(path, models, **kwargs)


#: the checkpoint saver of each family spec (the family seam has no save yet)
_SAVERS: Mapping[str, Callable[..., None]] = MappingProxyType({"sd": _save_sd})


def check_can_save(family: ModelFamily) -> None:
    """Refuse (before any model loads) a family whose checkpoints the tools cannot write yet."""
    _saver(family.spec_name)


def _saver(spec_name: str) -> Callable[..., None]:
    if spec_name not in _SAVERS:
        raise UserError(f"saving {spec_name.upper()} checkpoints is not supported by the LoRA tools yet")
    return _SAVERS[spec_name]


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
    return argparse.Namespace(pretrained_model_name_or_path=str(path), v2=v2, v_parameterization=v_parameterization)


def checkpoint_family(path: str | os.PathLike, v_parameterization: bool | None = None) -> ModelFamily:
    """The family of a model file or diffusers folder, read from the file (header or configs) through the family
    registry. ``v_parameterization`` None: a diffusers folder's scheduler says it, a single file is epsilon."""
    from library.models.loading import resolve_model_path

    source = resolve_model_path(str(path))
    if v_parameterization is None:
        scheduler = source / "scheduler" / "scheduler_config.json"
        v_parameterization = scheduler.is_file() and '"v_prediction"' in scheduler.read_text(encoding="utf-8")
    args = _family_args(source, None, bool(v_parameterization))
    return resolve_family(args, trains=tuple(FAMILY_SPECS), source=source)


def load_model_for_lora(
    path: str | os.PathLike,
    family: ModelFamily,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> ModelForLoRA:
    """Load a checkpoint of ``family`` (see :func:`checkpoint_family`) through its family spec.

    A single file carries no tokenizer; the CLIP tokenizer bundled with the toolkit (the same vocabulary and
    merges, SD2's padding for SD2) is used, so nothing is looked up online."""
    import tempfile

    from library.models.tiny import write_clip_tokenizer

    with tempfile.TemporaryDirectory(prefix="lora_tools_tokenizer_") as tmp:
        write_clip_tokenizer(Path(tmp) / "tokenizer", sd2=family.ss_v2)
        args = _family_args(path, family, family.objective.is_v_prediction)
        args.tokenizer_cache_dir = tmp
        models = family.spec.load(args, family, device=device, dtype=dtype)
    return ModelForLoRA(family, models, Path(path))


# ----------------------------------------------------------------------------------------------- reference models

REFERENCE_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd1": {
        "unet": dict(cross_attention_dim=768, attention_head_dim=8),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     projection_dim=768, hidden_act="quick_gelu"),
    },
    "sd2": {
        "unet": dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
        "text": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                     projection_dim=1024, hidden_act="gelu"),
    },
}


def reference_model(family_name: str) -> tuple[list[nn.Module], nn.Module] | None:
    """Full-size ``(text_encoders, unet)`` of a family on the ``meta`` device (SD1.5 / SD2.1 layouts), or None
    for families without models here yet."""
    if family_name not in REFERENCE_CONFIGS:
        return None
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = REFERENCE_CONFIGS[family_name]
    with init_empty_weights():
        unet = UNet2DConditionModel(**config["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**config["text"]))
    return [text_encoder], unet


def reference_pipeline(text_encoders: list[nn.Module], unet: nn.Module) -> Any:
    """A diffusers pipeline around the reference modules, to ask diffusers whether it loads a file."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=None, text_encoder=text_encoders[0], tokenizer=None, unet=unet, scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
