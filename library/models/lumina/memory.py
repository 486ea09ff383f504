"""``--cpu_offload_checkpointing``: what the transformer's forward saves for backward (with
``--gradient_checkpointing``, the inputs of every checkpointed block) is kept in pinned CPU memory and brought
back when backward needs it. A forward pre-hook enters ``torch.autograd.graph.save_on_cpu`` and a forward hook
leaves it, so the blocks recomputed during backward are not affected and the numbers do not change."""

from __future__ import annotations

from typing import Any

import torch


def offload_saved_activations(module: torch.nn.Module) -> list[Any]:
    """Install the hooks on ``module``; returns their handles."""
    active: list[Any] = []

    def enter(mod: torch.nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            context = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
            context.__enter__()
            active.append(context)

    def leave(mod: torch.nn.Module, args: Any, output: Any) -> None:
        if active:
            active.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
