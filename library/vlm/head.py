"""Stage 2: a task head on the (stage-1) VLM, as in the lmms-finetune fork's yes/no classifier, with the fork's
bugs fixed: the pooled position is one that has seen the image and the question (the last real token of the
prompt, or the attention-masked mean of every real token), never token 0 of a causal model or a pad position; a
yes/no head is trained with BCE on logits (a regression head with MSE); the prompt never contains the answer.

The head is saved beside the adapter as ``head.safetensors`` + ``head_config.json``; ``vlm_infer.py`` loads it.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.io_utils import atomic_save_file, atomic_write_json
from library.vlm.data import Sample
from library.vlm.encoding import model_inputs
from library.vlm.recipe import VLMRecipe, compute_dtype, mean_over_processes

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head_config.json"
POOLINGS = ("last", "mean")
HEAD_TYPES = ("binary", "regression")
_YES = {"yes", "true", "1", "y"}
_NO = {"no", "false", "0", "n"}


@dataclass(frozen=True)
class HeadConfig:
    hidden_size: int
    head_type: str = "binary"
    pooling: str = "last"


class TaskHead(torch.nn.Module):
    """One linear layer on a pooled hidden state: a logit (binary) or a value (regression)."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.linear = torch.nn.Linear(config.hidden_size, 1)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        return self.linear(pool(hidden, attention_mask, last_index, self.config.pooling).float()).squeeze(-1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, H) -> (B, H): the last real token (it attends to the image and the whole question), or the mean of
    the real tokens."""
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index.to(hidden.device)]
    mask = attention_mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def head_target(sample: Sample, head_type: str) -> float:
    """The target of a sample from its final answer: yes/no (true/false, 1/0) for a binary head, a number for a
    regression head."""
    answer = (sample.answer() or "").strip()
    if head_type == "regression":
        try:
            return float(answer)
        except ValueError:
            raise UserError(f"{sample.where}: a regression head needs a number as the answer, got {answer!r}") \
                from None
    words = re.findall(r"[a-z0-9]+", answer.lower())
    first = words[0] if words else ""
    if first in _YES:
        return 1.0
    if first in _NO:
        return 0.0
    raise UserError(f"{sample.where}: a yes/no head needs an answer starting with yes or no (or true/false, 1/0), "
                    f"got {answer!r}")


def last_hidden_state(model: Any, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The language model's last hidden states for a batch (logits are computed for one position only)."""
    inputs = model_inputs(batch, device, compute_dtype(model), with_labels=False)
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


def head_loss(head: TaskHead, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    targets = targets.to(outputs.device, outputs.dtype)
    if head.config.head_type == "binary":
        return torch.nn.functional.binary_cross_entropy_with_logits(outputs, targets)
    return torch.nn.functional.mse_loss(outputs, targets)


def save_head(folder: Path, head: TaskHead, extra: dict[str, torch.Tensor] | None = None) -> None:
    """``head.safetensors`` (``head.*`` and, for a model without adapter, ``base.<name>`` for each trained base
    tensor such as the projector) and ``head_config.json``."""
    from safetensors.torch import save_file

    tensors = {f"head.{k}": v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()}
    tensors.update({f"base.{k}": v.detach().contiguous().cpu() for k, v in (extra or {}).items()})
    atomic_save_file(folder / HEAD_WEIGHTS, lambda tmp: save_file(tensors, tmp))
    atomic_write_json(folder / HEAD_CONFIG, asdict(head.config))


def load_head(folder: Path, model: Any) -> TaskHead | None:
    """The head saved in ``folder`` (and its ``base.*`` tensors copied into ``model``), or None without one."""
    from safetensors.torch import load_file

    if not (folder / HEAD_WEIGHTS).is_file():
        return None
    try:
        config = HeadConfig(**json.loads((folder / HEAD_CONFIG).read_text(encoding="utf-8")))
        tensors = load_file(str(folder / HEAD_WEIGHTS))
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{folder}: cannot read the task head ({HEAD_WEIGHTS} / {HEAD_CONFIG}: {err})") from None
    head = TaskHead(config)
    head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    base = {k[5:]: v for k, v in tensors.items() if k.startswith("base.")}
    if base:
        params = dict(model.named_parameters())
        missing = sorted(set(base) - set(params))
        if missing:
            raise UserError(f"{folder / HEAD_WEIGHTS}: tensors {missing[:3]} do not exist in the base model")
        with torch.no_grad():
            for name, value in base.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
    return head.to(next(model.parameters()).device).eval()


class HeadRecipe(VLMRecipe):
    """Trains the head (and what else is unfrozen: the projector, the stage-1 LoRA) with BCE / MSE."""

    name = "vlm_head"

    def __init__(self, vlm: Any, head: TaskHead, *, use_lora: bool, info: dict[str, Any]):
        super().__init__(vlm, use_lora=use_lora, info=info)
        self.head = head

    def param_groups(self, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
        groups = [{"params": list(self.head.parameters()), "lr": args.head_lr or args.learning_rate}]
        names = ["head"]
        backbone = [p for p in self.model.parameters() if p.requires_grad]
        if backbone:
            groups.append({"params": backbone, "lr": args.learning_rate})
            names.append("backbone")
        return groups, names

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.head.parameters()) + [p for p in self.model.parameters() if p.requires_grad]

    def train_mode(self, training: bool) -> None:
        self.model.train(training)
        self.head.train(training)

    def head_outputs(self, run: Any, batch: dict[str, Any]) -> torch.Tensor:
        with run.accelerator.autocast():
            hidden = last_hidden_state(self.model, batch, run.accelerator.device)
            return self.head(hidden, batch["attention_mask"], batch["last_index"])

    def batch_loss(self, run: Any, batch: Any, global_step: int) -> torch.Tensor:
        return head_loss(self.head, self.head_outputs(run, batch), batch["head_target"])

    def validation_loss(self, run: Any, global_step: int) -> float | None:
        if run.val_loader is None:
            return None
        total, count = 0.0, 0
        run.val_loader.set_epoch(0)
        for i, batch in enumerate(run.val_loader):
            if run.args.max_validation_steps is not None and i >= run.args.max_validation_steps:
                break
            n = len(batch["head_target"])
            total += float(head_loss(self.head, self.head_outputs(run, batch), batch["head_target"])) * n
            count += n
        return mean_over_processes(run, total, count)

    def state_dict(self) -> dict[str, torch.Tensor]:
        weights = super().state_dict()
        weights.update({f"head.{k}": v.detach().clone() for k, v in self.head.state_dict().items()})
        return weights

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        head = {k[5:]: v for k, v in weights.items() if k.startswith("head.")}
        self.head.load_state_dict(head)
        super().load_state_dict({k: v for k, v in weights.items() if not k.startswith("head.")})

    def save(self, path: Path, info: Any, args: argparse.Namespace) -> None:
        if self.use_lora:
            super().save(path, info, args)  # the adapter, then save_extra adds the head
            return
        from library.io_utils import atomic_save_folder

        def write(folder: Path) -> None:
            atomic_write_json(folder / "vlm_training.json",
                              {**self.info, "global_step": info.global_step, "epoch": info.epoch})
            self.save_extra(folder)

        atomic_save_folder(path, write)

    def save_extra(self, folder: Path) -> None:
        # trained base tensors a PEFT adapter does not hold (e.g. the projector of a run without adapter)
        extra = {n: p for n, p in self.model.named_parameters()
                 if p.requires_grad and "lora_" not in n and "modules_to_save" not in n}
        save_head(folder, self.head, extra)


def add_head_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("stage 2: the head and what else trains")
    g.add_argument("--stage1_path", type=str, default=None,
                   help="adapter folder written by vlm_train.py (default: the base model alone)")
    g.add_argument("--head_type", choices=HEAD_TYPES, default="binary",
                   help="binary: yes/no answers, BCE with logits; regression: numeric answers, MSE")
    g.add_argument("--pooling", choices=POOLINGS, default="last",
                   help="last: the prompt's last real token; mean: the mean of every real token")
    g.add_argument("--head_lr", type=float, default=None, help="learning rate of the head (default --learning_rate)")
    g.add_argument("--train_vision_projector", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the vision-language projector")
    g.add_argument("--train_lora", action="store_true", help="also train the stage-1 LoRA weights")


def head_option_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.train_lora and not args.stage1_path:
        problems.append("--train_lora needs --stage1_path (the adapter whose LoRA weights train)")
    if args.stage1_path and not (Path(args.stage1_path) / "adapter_config.json").is_file():
        problems.append(f"--stage1_path {args.stage1_path}: not an adapter folder of vlm_train.py (no "
                        "adapter_config.json)")
    return problems


def set_projector_trainable(model: torch.nn.Module, projector: str, trainable: bool) -> None:
    """Unfreeze (or freeze) the projector, or its PEFT copy when the adapter saved one."""
    leaf = projector.rsplit(".", 1)[-1]
    wrapped = any("modules_to_save" in n for n, _ in model.named_parameters() if f".{leaf}." in n)
    for name, param in model.named_parameters():
        if f".{leaf}." in name and "original_module" not in name and (not wrapped or "modules_to_save" in name):
            param.requires_grad_(trainable)
