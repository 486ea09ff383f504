"""``--fused_backward_pass``: the optimizer updates each parameter as soon as its gradient is complete, during
the backward pass, and frees that gradient at once, so a full set of gradients never exists in memory.

Each trained parameter gets a post-accumulate-grad hook that (with several processes) averages the
gradient across processes, clips it on its own to ``--max_grad_norm`` (a per-tensor norm, as sd-scripts
does: the global norm is unknown until the whole backward pass is over), runs the optimizer's update for this
parameter alone with its group's current settings (looked up when the hook runs, so the scheduler's learning
rate and a resumed optimizer's groups apply), and drops the gradient.
Only AdaFactor is allowed (its update of a parameter reads that parameter's state only) and gradient
accumulation must be 1; ``library.training.optimizers.validate_optimizer_args`` enforces both.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def _step_one(optimizer: torch.optim.Optimizer, group: dict[str, Any], param: torch.nn.Parameter) -> None:
    """``optimizer.step()`` restricted to ``param``: the optimizer sees one group holding only it."""
    groups = optimizer.param_groups
    optimizer.param_groups = [{**group, "params": [param]}]
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = groups


def attach_fused_backward(optimizer: Any, *, max_grad_norm: float | None, num_processes: int = 1) -> list[Any]:
    """Register the per-parameter update hooks on every parameter of ``optimizer`` (accelerate's wrapper or a
    plain optimizer) that requires a gradient; returns the hook handles. The training loop then must not
    call ``optimizer.step()`` itself."""
    inner = getattr(optimizer, "optimizer", optimizer)
    reduce: Callable[[torch.Tensor], None] | None = None
    if num_processes > 1:
        import torch.distributed as dist

        def reduce(grad: torch.Tensor) -> None:
            dist.all_reduce(grad)
            grad /= num_processes

    handles = []
    for index, group in enumerate(inner.param_groups):
        for param in group["params"]:
            if not param.requires_grad:
                continue

            def hook(p: torch.Tensor, index: int = index) -> None:
                if p.grad is None:
                    return
                if reduce is not None:
                    reduce(p.grad)
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([p], max_grad_norm)
                _step_one(inner, inner.param_groups[index], p)
                p.grad = None

            handles.append(param.register_post_accumulate_grad_hook(hook))
    return handles
