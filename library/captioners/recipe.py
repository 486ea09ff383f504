"""The captioner LoRA recipe: a PEFT LoRA on a BLIP or Florence-2 model, trained on the toolkit's loop.

The recipe owns the model, the batch -> loss step (the family's inputs, padding -100), the held-out loss,
caption samples for fixed held-out images, and PEFT adapter folders (``adapter_config.json`` +
``adapter_model.safetensors``) written atomically: the final adapter into the output folder itself,
intermediate ones into ``<name>-step00000100`` / ``<name>-000002`` folders beside it.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.captioners.data import CaptionPair
from library.captioners.families import Captioner
from library.errors import UserError
from library.io_utils import atomic_write_text
from library.training.outputs import OutputNames
from library.training.recipes import LoopRecipe, SaveInfo

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    rslora: bool = False


@dataclass(frozen=True)
class SampleSettings:
    num_beams: int = 3
    max_length: int = 75


class AdapterOutputNames(OutputNames):
    """The final adapter is the output folder itself (``--peft_model <output_dir>``); intermediate adapters
    and states are numbered folders inside it (never overwritten: see ``check_output_dir``)."""

    def final(self) -> Path:
        return self.output_dir

    def existing(self) -> list[Path]:
        found = [p for p in super().existing() if p != self.output_dir]
        return [self.output_dir / f for f in ADAPTER_FILES if (self.output_dir / f).is_file()] + found


def open_image(path: Path) -> Any:
    """An image as RGB, or a UserError naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise UserError(f"{path}: cannot read the image ({type(err).__name__}: {err}); fix or remove it from the "
                        "dataset") from None


def unmatched_targets(model: torch.nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Targets that name no Linear/Conv module of ``model`` (PEFT matches a name or a dotted suffix)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def module_suffixes(model: torch.nn.Module) -> list[str]:
    """The distinct last two name parts of the Linear modules (what ``--target_modules`` can name)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return sorted({".".join(n.split(".")[-2:]) for n in names})


class CaptionerLoRARecipe(LoopRecipe):
    name = "captioner_lora"
    file_extension = ""  # adapters are folders

    def __init__(self, captioner: Captioner, lora: LoraSettings, sampling: SampleSettings):
        self.captioner = captioner
        self.lora = lora
        self.sampling = sampling
        self.model: Any = None

    def option_problems(self, args: argparse.Namespace) -> list[str]:
        return []  # the scripts check their options before the model loads

    def setup(self, *, gradient_checkpointing: bool, quantized: bool) -> None:
        """Wrap the loaded model in a PEFT LoRA (only the adapter trains)."""
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        base = self.captioner.model
        missing = unmatched_targets(base, self.lora.target_modules)
        if missing:
            raise UserError(f"--target_modules {' '.join(missing)}: no Linear module of this "
                            f"{self.captioner.family.model_class} has that name; names it has: "
                            f"{', '.join(module_suffixes(base))}")
        base.requires_grad_(False)
        if quantized:
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
        elif gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        config = LoraConfig(r=self.lora.rank, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
                            target_modules=list(self.lora.target_modules), bias="none", use_rslora=self.lora.rslora)
        self.model = get_peft_model(base, config)
        self.captioner.model = self.model

    def param_groups(self, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
        return [{"params": self.trainable_parameters()}], ["lora"]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def train_mode(self, training: bool) -> None:
        self.model.train(training)

    def _loss(self, run: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = run.accelerator.device
        inputs = {k: v.to(device) for k, v in batch.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with run.accelerator.autocast():
            return self.model(**inputs).loss

    def batch_loss(self, run: Any, batch: Any, global_step: int) -> torch.Tensor:
        return self._loss(run, batch)

    def validation_loss(self, run: Any, global_step: int) -> float | None:
        """The mean loss over the held-out pairs (weighted by batch size); every process computes all."""
        if not run.val_loader:
            return None
        total, count = 0.0, 0
        for batch in run.val_loader:
            size = len(batch["labels"])
            total += float(self._loss(run, batch)) * size
            count += size
        return total / count

    def sample(self, run: Any, global_step: int, epoch: int | None) -> None:
        """Captions of the fixed held-out images, to ``<output_dir>/samples/`` and TensorBoard."""
        from library.training.sampling import sample_tag

        acc = run.accelerator
        if not acc.is_main_process or not run.sample_prompts:
            return
        pairs: list[CaptionPair] = run.sample_prompts
        captions = []
        for start in range(0, len(pairs), 4):
            chunk = pairs[start:start + 4]
            captions += self.captioner.caption([open_image(p.image) for p in chunk], num_beams=self.sampling.num_beams,
                                               max_length=self.sampling.max_length)
        lines = [f"{p.image.name}\n  generated: {c}\n  reference: {p.text}" for p, c in zip(pairs, captions)]
        text = "\n".join(lines)
        tag = sample_tag(step=global_step, epoch=epoch)
        folder = Path(run.args.output_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / f"{run.names.name}_{tag}.txt", text + "\n")
        print(f"\nsamples at step {global_step}:\n{text}", flush=True)
        if "tensorboard" in [t.name for t in acc.trackers]:
            writer = acc.get_tracker("tensorboard", unwrap=True)
            writer.add_text("samples", "\n\n".join(f"**{p.image.name}**: {c} (reference: {p.text})"
                                                   for p, c in zip(pairs, captions)), global_step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        own = dict(self.model.named_parameters())
        expected = {n for n, p in own.items() if p.requires_grad}
        if set(weights) != expected:
            raise UserError(f"the resumed state holds other LoRA weights ({len(weights)} tensors, this run trains "
                            f"{len(expected)}): resume with the saved run's --rank, --target_modules and model")
        with torch.no_grad():
            for name, value in weights.items():
                own[name].copy_(value)

    def save(self, path: Path, info: SaveInfo, args: argparse.Namespace) -> None:
        save_adapter(self.model, path, into_folder=Path(path) == Path(args.output_dir))


def save_adapter(model: Any, path: Path, *, into_folder: bool = False) -> None:
    """``model.save_pretrained`` into a temporary folder, then moved into place. With ``into_folder``,
    ``path`` is the output folder, which receives the adapter files beside its numbered saves."""
    path = Path(path)
    parent = path if into_folder else path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{path.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    if into_folder:
        for item in tmp.iterdir():
            os.replace(item, path / item.name)
        tmp.rmdir()
        return
    if path.exists():  # a resumed run replaces the saves of its own later steps
        shutil.rmtree(path)
    tmp.rename(path)
