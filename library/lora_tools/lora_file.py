"""Kohya-format LoRA files as a set of modules, whatever spelling the file uses; written back in sd-scripts' names.

Spellings read (each is reported by ``check_lora_weights.py`` as a note):

- sd-scripts' own: ``lora_unet_<path>`` / ``lora_te[12]_text_model_<path>`` with ``.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``;
- text encoder names without ``text_model_`` (sd-scripts and others under transformers 5);
- PEFT suffixes ``.lora_A.weight`` / ``.lora_B.weight`` on kohya names;
- diffusers/PEFT files (``unet.<path>.lora_A.weight``, ``text_encoder.<path>...``);
- files without ``alpha`` (alpha = rank, as every loader assumes).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from library.errors import UserError
from library.models.weights import load_pickle, read_safetensors_metadata
from networks.lora import lora_delta, standard_key

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_DOWN, _UP, _ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
_PEFT_SUFFIX = {"lora_A.weight": _DOWN, "lora_B.weight": _UP}
_DIFFUSERS_PREFIX = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)$")

NOTE_NO_TEXT_MODEL = "text encoder names without 'text_model_' (written under transformers 5); read as the standard"
NOTE_PEFT_SUFFIX = "PEFT-style lora_A/lora_B suffixes; read as lora_down/lora_up"
NOTE_DIFFUSERS = "diffusers/PEFT module paths (unet.*, text_encoder.*); read as kohya names"
NOTE_NO_ALPHA = "modules without alpha; alpha = rank (scale 1), as every loader assumes"


@dataclass
class LoRAModuleWeights:
    """One module: ``down`` [r, in] or [r, in, kh, kw], ``up`` [out, r] or [out, r, 1, 1], and ``alpha``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def is_3x3(self) -> bool:
        return self.is_conv and tuple(self.down.shape[2:]) != (1, 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the weight this module changes."""
        return (int(self.up.shape[0]), *self.down.shape[1:])

    def delta_norm(self) -> float:
        """``|up @ down * alpha / r|`` (Frobenius) from the rank x rank Gram matrices, without the full delta:
        ``|U D|^2 = sum((U^T U) * (D D^T))``."""
        up = self.up.flatten(1).double()
        down = self.down.flatten(1).double()
        squared = float(((up.T @ up) * (down @ down.T)).sum())
        return max(squared, 0.0) ** 0.5 * abs(self.scale)

    def delta(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``up @ down * alpha / r`` in the shape of the original weight (multiplier 1)."""
        up = self.up.to(device, dtype)
        down = self.down.to(device, dtype)
        return lora_delta(up, down) * self.scale


@dataclass
class LoRAFile:
    """A LoRA file's modules under their standard kohya names, its metadata and what reading it noticed."""

    path: Path
    modules: dict[str, LoRAModuleWeights]
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)


def _split_key(key: str) -> tuple[str, str, str | None]:
    """``(module name, part, note)`` for one tensor key, part being lora_down.weight / lora_up.weight / alpha."""
    note = None
    match = _DIFFUSERS_PREFIX.match(key)
    if match:
        component, rest = match.groups()
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}[component]
        key, note = prefix + rest, NOTE_DIFFUSERS
    for suffix, part in (*_PEFT_SUFFIX.items(), (_DOWN, _DOWN), (_UP, _UP), (_ALPHA, _ALPHA)):
        if key.endswith("." + suffix):
            name = key[: -len(suffix) - 1]
            if suffix in _PEFT_SUFFIX and note is None:
                note = NOTE_PEFT_SUFFIX
            if match:
                name = name.replace(".", "_")
            return name, part, note
    return key, "", note


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), read_safetensors_metadata(path)
        except Exception as err:  # noqa: BLE001 - a corrupt or foreign file: say which one
            raise UserError(f"{path}: cannot read this LoRA file ({err}); is it complete?") from None
    obj = load_pickle(path)  # weights_only: a pickle that would run code is refused with an explanation
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: not a LoRA weights file (expected a dictionary of tensors)")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}


def check_lora_path(file: str | os.PathLike, what: str = "LoRA file") -> Path:
    """The path of an existing LoRA file with a known suffix (checked before anything loads)."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise UserError(f"{what} {path}: not found" + (" (it is a folder)" if path.is_dir() else ""))
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise UserError(f"{what} {path}: unsupported file type '{path.suffix}'; use .safetensors, .ckpt or .pt")
    return path


def read_lora(file: str | os.PathLike) -> LoRAFile:
    """Read a LoRA file into standard-named modules. A file without any LoRA module, a module with only one of
    down/up, or ranks that disagree between down and up are one :class:`UserError` naming the modules."""
    path = check_lora_path(file)
    tensors, metadata = _read_tensors(path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    notes: set[str] = set()
    ignored = []
    for key, value in tensors.items():
        name, part, note = _split_key(key)
        if not part:
            ignored.append(key)
            continue
        standard = standard_key(name)
        if standard != name:
            notes.add(NOTE_NO_TEXT_MODEL)
        if note:
            notes.add(note)
        parts.setdefault(standard, {})[part] = value
    if NOTE_DIFFUSERS in notes and any(n.startswith("lora_te2_") for n in parts):  # two text encoders: te1/te2
        parts = {("lora_te1_" + n[8:] if n.startswith("lora_te_") else n): p for n, p in parts.items()}
    modules, problems = _assemble(parts, notes)
    if problems:
        raise UserError.from_problems(f"{path}: not a usable LoRA file", problems)
    if not modules:
        found = ", ".join(sorted(tensors)[:3]) or "no tensors"
        raise UserError(
            f"{path}: no LoRA modules (no *.lora_down.weight / *.lora_up.weight keys; found {found}). "
            "Is it a model checkpoint, an embedding or a LyCORIS (LoHa/LoKr) file?"
        )
    return LoRAFile(path, modules, dict(metadata), sorted(notes), sorted(ignored))


def _assemble(
    parts: Mapping[str, Mapping[str, torch.Tensor]], notes: set[str]
) -> tuple[dict[str, LoRAModuleWeights], list[str]]:
    modules: dict[str, LoRAModuleWeights] = {}
    problems = []
    for name, sd in sorted(parts.items()):
        if _DOWN not in sd or _UP not in sd:
            missing = _DOWN if _DOWN not in sd else _UP
            if set(sd) != {_ALPHA}:
                problems.append(f"{name}: has no {missing}")
            continue
        down, up = sd[_DOWN], sd[_UP]
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            problems.append(f"{name}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} do not fit together")
            continue
        if _ALPHA in sd:
            alpha = float(sd[_ALPHA].float())
        else:
            alpha = 0.0
            notes.add(NOTE_NO_ALPHA)
        modules[name] = LoRAModuleWeights(down, up, alpha or float(down.shape[0]))
    return modules, problems


def lora_state_dict(
    modules: Mapping[str, LoRAModuleWeights], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The tensors in sd-scripts' key names (alpha cast to ``dtype`` as well, as sd-scripts saves it)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        target = dtype or m.down.dtype
        out[f"{name}.{_DOWN}"] = m.down.detach().to("cpu", target).contiguous()
        out[f"{name}.{_UP}"] = m.up.detach().to("cpu", target).contiguous()
        out[f"{name}.{_ALPHA}"] = torch.tensor(float(m.alpha)).to(target)
    return out


def dims_metadata(modules: Iterable[LoRAModuleWeights]) -> dict[str, str]:
    """``ss_network_dim`` / ``ss_network_alpha`` of the linear (and 1x1) modules: the value when all agree,
    ``Dynamic`` otherwise (sd-scripts' convention)."""
    plain = [m for m in modules if not m.is_3x3] or list(modules)
    ranks = {m.rank for m in plain}
    alphas = {float(m.alpha) for m in plain}
    return {
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
    }


def write_lora(
    path: str | os.PathLike,
    modules: Mapping[str, LoRAModuleWeights],
    metadata: Mapping[str, str] | None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``modules`` atomically in sd-scripts' names: ``.safetensors`` with ``metadata`` and fresh
    ``sshs_*`` hashes, ``.ckpt``/``.pt`` as a plain tensor dictionary (pickles carry no metadata)."""
    from library.io_utils import atomic_save_file
    from library.models.metadata import save_safetensors

    tensors = lora_state_dict(modules, dtype)
    if Path(path).suffix.lower() == ".safetensors":
        meta = {k: v for k, v in (metadata or {}).items() if not k.startswith("sshs_")}
        save_safetensors(path, tensors, meta)
    else:
        atomic_save_file(path, lambda tmp: torch.save(tensors, tmp))
