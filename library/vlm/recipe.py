"""The VLM recipe for the toolkit's one training loop: the loss of a batch is the model's next-token loss on the
supervised (assistant) tokens; the held-out loss is the token-weighted mean over ``--eval_data_path``; a save is a
PEFT adapter folder (LoRA, the projector) or, for full fine-tuning, a complete transformers model folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.io_utils import atomic_save_folder, atomic_write_json
from library.training.recipes import LoopRecipe, SaveInfo
from library.vlm.adapters import trainable_named_parameters
from library.vlm.encoding import IGNORE_INDEX, model_inputs
from library.vlm.loading import VLM

TRAINING_INFO_FILE = "vlm_training.json"


class VLMRecipe(LoopRecipe):
    """Stage 1: supervised fine-tuning of a VLM (``vlm.model`` already wrapped by ``adapters.apply_targets``)."""

    name = "vlm"
    file_extension = ""  # saves are folders

    def __init__(self, vlm: VLM, *, use_lora: bool, info: dict[str, Any]):
        self.vlm = vlm
        self.use_lora = use_lora
        self.info = info  # written beside each save (base model, family, options)

    @property
    def model(self) -> Any:
        return self.vlm.model

    def option_problems(self, args: argparse.Namespace) -> list[str]:
        return []

    def param_groups(self, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
        return [{"params": self.trainable_parameters(), "lr": args.learning_rate}], ["vlm"]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(trainable_named_parameters(self.model).values())

    def train_mode(self, training: bool) -> None:
        self.model.train(training)

    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def forward(self, run: Any, batch: dict[str, Any], *, with_labels: bool = True) -> Any:
        inputs = model_inputs(batch, run.accelerator.device, compute_dtype(self.model), with_labels=with_labels)
        with run.accelerator.autocast():
            return self.model(**inputs)

    def batch_loss(self, run: Any, batch: Any, global_step: int) -> torch.Tensor:
        return self.forward(run, batch).loss

    def validation_loss(self, run: Any, global_step: int) -> float | None:
        if run.val_loader is None:
            return None
        total, tokens = 0.0, 0
        run.val_loader.set_epoch(0)
        for i, batch in enumerate(run.val_loader):
            if run.args.max_validation_steps is not None and i >= run.args.max_validation_steps:
                break
            count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(self.forward(run, batch).loss) * count
            tokens += count
        return mean_over_processes(run, total, tokens)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in trainable_named_parameters(self.model).items()}

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        params = trainable_named_parameters(self.model)
        if set(params) != set(weights):
            missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
            raise UserError(f"the resumed state does not fit this run ({len(missing)} trained tensors missing, e.g. "
                            f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}): resume with the "
                            "saved run's model and --use_lora / --lora_* / --train_vision_* options")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name].to(param.device, param.dtype))

    def save(self, path: Path, info: SaveInfo, args: argparse.Namespace) -> None:
        vlm = self.vlm

        def write(folder: Path) -> None:
            vlm.model.save_pretrained(str(folder))
            if not self.use_lora:  # a complete model folder: processing files too
                vlm.tokenizer.save_pretrained(str(folder))
                vlm.image_processor.save_pretrained(str(folder))
            atomic_write_json(folder / TRAINING_INFO_FILE,
                              {**self.info, "global_step": info.global_step, "epoch": info.epoch})
            self.save_extra(folder)

        atomic_save_folder(path, write)

    def save_extra(self, folder: Path) -> None:
        """More files of a save (the stage-2 head)."""


def compute_dtype(model: Any) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            return p.dtype
    return torch.float32


def mean_over_processes(run: Any, total: float, count: int) -> float:
    acc = run.accelerator
    if acc.num_processes > 1:
        values = acc.reduce(torch.tensor([total, float(count)], device=acc.device, dtype=torch.float64), "sum")
        total, count = float(values[0]), int(values[1])
    return total / max(count, 1)
