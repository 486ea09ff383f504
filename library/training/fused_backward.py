"""``--fused_backward_pass``: the optimizer updates each parameter as soon as its gradient is complete, during
the backward pass, and frees that gradient at once, so a full set of gradients never exists in memory.

Each trained parameter gets a post-accumulate-grad hook that (with several processes) averages the
gradient across processes, clips it on its own to ``--max_grad_norm`` (a per-tensor norm, as sd-scripts
does: the global norm is unknown until the whole backward pass is over), runs the optimizer's update for this
parameter alone with its group's current settings (looked up when the hook runs, so the scheduler's learning
rate and a resumed optimizer's groups apply), and drops the gradient.
Only AdaFactor is allowed (its update of a parameter reads that parameter's state only) and gradient
accumulation must be 1; ``library.training.optimizers.validate_optimizer_args`` enforces both.

``--blockwise_fused_optimizers`` (``flux_train.py``) works with any optimizer whose state is per parameter: the
recipe gives one parameter group per block, and a group is stepped as soon as every one of its parameters has
its gradient, then its gradients are freed. Only one block's gradients exist at a time. Gradients are clipped per
tensor, as sd-scripts does. Groups left incomplete by a step (a parameter that got no gradient) are stepped by
:meth:`BlockwiseSteps.flush` at the end of the step, so no update is ever lost.
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


def _reducer(num_processes: int) -> Callable[[torch.Tensor], None] | None:
    """Average a gradient over processes (None with one process)."""
    if num_processes <= 1:
        return None
    import torch.distributed as dist

    def reduce(grad: torch.Tensor) -> None:
        dist.all_reduce(grad)
        grad /= num_processes

    return reduce


def _step_group(optimizer: torch.optim.Optimizer, index: int) -> None:
    """``optimizer.step()`` for group ``index`` alone (the other groups are hidden while it runs)."""
    groups = optimizer.param_groups
    optimizer.param_groups = [groups[index]]
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = groups
    for p in groups[index]["params"]:
        p.grad = None


class BlockwiseSteps:
    """The per-group counters of ``--blockwise_fused_optimizers`` (see the module docstring)."""

    def __init__(self, optimizer: Any, *, max_grad_norm: float | None, num_processes: int = 1):
        self.inner = getattr(optimizer, "optimizer", optimizer)
        self.sizes = [sum(p.requires_grad for p in g["params"]) for g in self.inner.param_groups]
        self.ready = [0] * len(self.sizes)
        self.handles: list[Any] = []
        reduce = _reducer(num_processes)
        for index, group in enumerate(self.inner.param_groups):
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
                    self.ready[index] += 1
                    if self.ready[index] == self.sizes[index]:
                        _step_group(self.inner, index)
                        self.ready[index] = 0

                self.handles.append(param.register_post_accumulate_grad_hook(hook))

    def flush(self) -> None:
        """Step the groups that did not get every gradient during this step's backward pass."""
        for index, count in enumerate(self.ready):
            if count:
                _step_group(self.inner, index)
                self.ready[index] = 0


def attach_fused_backward(optimizer: Any, *, max_grad_norm: float | None, num_processes: int = 1) -> list[Any]:
    """Register the per-parameter update hooks on every parameter of ``optimizer`` (accelerate's wrapper or a
    plain optimizer) that requires a gradient; returns the hook handles. The training loop then must not
    call ``optimizer.step()`` itself."""
    inner = getattr(optimizer, "optimizer", optimizer)
    reduce = _reducer(num_processes)
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


def blockwise_problems(args: Any) -> list[str]:
    """What ``--blockwise_fused_optimizers`` cannot be combined with."""
    if not getattr(args, "blockwise_fused_optimizers", False):
        return []
    from library.errors import UserError
    from library.training.optimizers import resolve_optimizer_type

    problems = []
    if getattr(args, "fused_backward_pass", False):
        problems.append("--blockwise_fused_optimizers and --fused_backward_pass both step the optimizer inside the "
                        "backward pass: use one of them")
    if getattr(args, "gradient_accumulation_steps", 1) > 1:
        problems.append("--blockwise_fused_optimizers cannot be used with --gradient_accumulation_steps > 1 (each "
                        "block is updated as soon as its gradients exist)")
    if args.mixed_precision == "fp16":
        problems.append("--blockwise_fused_optimizers cannot be used with --mixed_precision fp16: fp16 loss scaling "
                        "needs every gradient before any weight changes; use --mixed_precision bf16 (or no)")
    try:
        name = resolve_optimizer_type(args)
    except UserError:  # the optimizer checks report a bad name themselves
        name = ""
    if "schedulefree" in name.lower():
        problems.append(f"--blockwise_fused_optimizers cannot be used with the schedule-free optimizer {name} (its "
                        "averaged weights need the whole step); choose another --optimizer_type")
    return problems
