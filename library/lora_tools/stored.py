"""A checkpoint file as the LoRA tools change it: its tensors as stored, no model built.

sd-scripts' LoRAs of the transformer families (SD3, Lumina, FLUX's text encoders) sit on the layers of the
original single file: a module ``lora_unet_joint_blocks_0_x_block_attn_qkv`` changes the tensor
``model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight`` (its fused q/k/v rows in file order). So such a
checkpoint is merged into (and extracted from) as the file's tensors: each kohya name maps to one stored weight
by a key prefix, every other tensor is written back unchanged (same name, same dtype unless ``--save_precision``),
and the model costs the file's size in memory (read without mmap, written one tensor at a time).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from library.errors import UserError


class TensorSlot(nn.Module):
    """One weight of a :class:`StoredCheckpoint`, in the place of a model's module (``.weight``). Storing a new
    value replaces the tensor in the checkpoint, in ``dtype`` (the merge's ``--precision``) or the stored dtype."""

    def __init__(self, tensors: dict[str, torch.Tensor], key: str, dtype: torch.dtype | None):
        super().__init__()
        self._tensors, self.key, self._dtype = tensors, key, dtype

    @property
    def weight(self) -> torch.Tensor:
        return self._tensors[self.key]

    def store(self, value: torch.Tensor) -> None:
        self._tensors[self.key] = value.to("cpu", self._dtype or self._tensors[self.key].dtype).contiguous()


@dataclass(frozen=True)
class StoredPart:
    """Which tensors of a file a family's LoRA modules change: ``prefixes`` maps a key prefix to the kohya prefix
    of the modules under it (the first that matches wins; ``""`` catches unprefixed keys), and ``wanted`` keeps
    the kohya names the family's LoRA network creates (norms, embeddings and projections are not LoRA targets)."""

    prefixes: tuple[tuple[str, str], ...]
    wanted: Callable[[str], bool]

    def lora_name(self, key: str) -> str | None:
        if not key.endswith(".weight"):
            return None
        for prefix, lora_prefix in self.prefixes:
            if key.startswith(prefix):
                name = f"{lora_prefix}_{key[len(prefix):-len('.weight')].replace('.', '_')}"
                return name if self.wanted(name) else None
        return None


def name_filter(*patterns: str) -> Callable[[str], bool]:
    """Kohya names matching any of ``patterns`` (full match)."""
    rx = re.compile("|".join(f"(?:{p})" for p in patterns))
    return lambda name: rx.fullmatch(name) is not None


# the CLIP and T5 layers sd-scripts' networks put LoRAs on (``networks.lora``'s CLIPAttention/CLIPMLP, T5's
# attention and gated MLP), under each text encoder's kohya prefix
CLIP_LAYERS = r"text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
T5_LAYERS = r"encoder_block_\d+_layer_\d+_(SelfAttention_(q|k|v|o)|DenseReluDense_(wi_0|wi_1|wo))"


#: text encoder files given beside a model (sd-scripts' ``flux_merge_lora.py --clip_l/--t5xxl``), by option name
TEXT_ENCODER_FILES: Mapping[str, StoredPart] = {
    "clip_l": StoredPart((("text_model.", "lora_te1_text_model"), ("", "lora_te1_text_model")),
                         name_filter(f"lora_te1_{CLIP_LAYERS}")),
    "t5xxl": StoredPart((("", "lora_te3"),), name_filter(f"lora_te3_{T5_LAYERS}")),
}


@dataclass
class StoredCheckpoint:
    """The tensors and metadata of one file (``source``), with what its LoRA modules change (``part``)."""

    source: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    part: StoredPart
    dtype: torch.dtype | None = None
    names: dict[str, str] = field(default_factory=dict)  # kohya name -> key

    def __post_init__(self) -> None:
        for key in self.tensors:
            name = self.part.lora_name(key)
            if name is not None and self.tensors[key].dim() in (2, 4):
                self.names[name] = key

    def targets(self) -> dict[str, tuple[nn.Module, ...]]:
        return {name: (TensorSlot(self.tensors, key, self.dtype),) for name, key in self.names.items()}

    def save(self, path: Path, dtype: torch.dtype | None, metadata: Mapping[str, str] | None) -> None:
        """Every tensor back under its name, floating ones in ``dtype`` when given, one at a time, atomically."""
        from library.models.safetensors_stream import save_safetensors_streaming

        def cast(t: torch.Tensor) -> torch.dtype:
            return dtype if dtype is not None and t.is_floating_point() else t.dtype

        shapes = {k: (t.shape, cast(t)) for k, t in self.tensors.items()}
        producers = {k: (lambda k=k: self.tensors[k].to(cast(self.tensors[k]))) for k in self.tensors}
        save_safetensors_streaming(path, producers, shapes, dict(metadata) if metadata else None)


def read_stored(path: str | Path, part: StoredPart, dtype: torch.dtype | None, what: str) -> StoredCheckpoint:
    """A ``.safetensors`` file as a :class:`StoredCheckpoint` (``what`` names it in messages)."""
    from library.models.weights import read_weights

    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        raise UserError(f"{what} {path}: expected a .safetensors file")
    tensors, metadata = read_weights(path)
    checkpoint = StoredCheckpoint(path, tensors, metadata, part, dtype)
    if not checkpoint.names:
        raise UserError(f"{what} {path}: no layer of this file takes a LoRA module; is it the right file?")
    return checkpoint


def combined_targets(parts: Iterable[StoredCheckpoint]) -> dict[str, tuple[nn.Module, ...]]:
    found: dict[str, tuple[nn.Module, ...]] = {}
    for part in parts:
        found.update(part.targets())
    return found
