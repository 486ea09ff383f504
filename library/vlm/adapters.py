"""What trains in a VLM run: LoRA on the language model's linear layers (targets configurable), optional vision
LoRA, the projector trained and saved with the adapter (PEFT ``modules_to_save``), QLoRA on a 4-bit base, or
full fine-tuning of the language model (and optionally the projector and vision tower)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from library.errors import UserError
from library.vlm.families import VLMFamily


@dataclass(frozen=True)
class TrainingTargets:
    use_lora: bool = True
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ()  # leaf names (q_proj, ...); empty: every linear layer of the LM
    train_vision_projector: bool = True
    train_vision_encoder: bool = False
    use_vision_lora: bool = False
    quantized: bool = False

    def problems(self) -> list[str]:
        found = []
        if self.use_lora and self.train_vision_encoder and not self.use_vision_lora:
            found.append("--train_vision_encoder with LoRA: an adapter holds no full vision weights; add "
                         "--use_vision_lora (LoRA on the vision tower) or full fine-tune with --no-use_lora")
        if not self.use_lora and (self.quantized or self.use_vision_lora):
            found.append("--q_lora and --use_vision_lora need LoRA: drop --no-use_lora")
        if self.use_lora and self.lora_r < 1:
            found.append(f"--lora_r must be >= 1 (got {self.lora_r})")
        if not 0 <= self.lora_dropout < 1:
            found.append(f"--lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        return found


def _is_linear(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def linear_leaf_names(model: torch.nn.Module, family: VLMFamily, *, vision: bool) -> set[str]:
    """Leaf names of the linear layers of the language model (or, with ``vision``, of the vision tower)."""
    names = set()
    for name, module in model.named_modules():
        inside = family.is_vision_module(name) if vision else name.startswith(family.language_prefix)
        if inside and _is_linear(module):
            names.add(name.rsplit(".", 1)[-1])
    return names


def lora_target_pattern(model: torch.nn.Module, family: VLMFamily, targets: TrainingTargets) -> str:
    """A PEFT ``target_modules`` regex: the chosen linear layers of the language model, plus those of the vision
    tower with ``use_vision_lora`` (never the projector, which trains in full)."""
    available = linear_leaf_names(model, family, vision=False)
    chosen = set(targets.target_modules) or available
    unknown = sorted(chosen - available)
    if unknown:
        raise UserError(f"--lora_target_modules {' '.join(unknown)}: no such linear layer in the language model; "
                        f"it has {', '.join(sorted(available))}")
    parts = [rf"{re.escape(family.language_prefix)}.*\.({'|'.join(sorted(chosen))})"]
    if targets.use_vision_lora:
        vision = linear_leaf_names(model, family, vision=True)
        prefix = re.escape(family.vision_prefix + ".")
        projector = re.escape(family.projector)
        parts.append(rf"(?!{projector}){prefix}.*\.({'|'.join(sorted(vision))})")
    return "^(" + "|".join(parts) + ")$"


def apply_targets(model: Any, family: VLMFamily, targets: TrainingTargets, *, gradient_checkpointing: bool) -> Any:
    """Freeze the base, then wrap it in a PEFT LoRA model or unfreeze what a full fine-tune trains; returns the
    model to train."""
    model.requires_grad_(False)
    if targets.quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not targets.use_lora:
        for name, param in model.named_parameters():
            if name.startswith(family.language_prefix) or name.startswith("lm_head."):
                param.requires_grad_(True)
            elif family.is_projector(name.rsplit(".", 1)[0]):
                param.requires_grad_(targets.train_vision_projector)
            elif family.is_vision_module(name.rsplit(".", 1)[0]):
                param.requires_grad_(targets.train_vision_encoder)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=targets.lora_r, lora_alpha=targets.lora_alpha, lora_dropout=targets.lora_dropout,
                        target_modules=lora_target_pattern(model, family, targets), bias="none",
                        modules_to_save=[family.projector] if targets.train_vision_projector else None,
                        task_type="CAUSAL_LM")
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, config)


def trainable_named_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
