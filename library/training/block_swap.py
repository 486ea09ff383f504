"""``--blocks_to_swap N``: some transformer blocks live in host memory and are copied to the accelerator just
before they run, so a model larger than the accelerator's memory trains.

Family-agnostic: a family names its blocks in execution order and which of them swap
(``FamilySpec.swappable_blocks``); :class:`BlockSwap` hooks them. On CUDA the copies run on a side stream
from pinned host memory, overlapped with the computation of the previous block: block ``i + 1`` is fetched
while ``i`` runs (forward) and ``i - 1`` while ``i`` is recomputed (backward).

When a block's weights leave the device:

- no gradient is being recorded (sampling, validation): right after the block ran;
- training forward pass: right after the block ran. This needs gradient checkpointing: the checkpointed block
  keeps no reference to its weights, and the backward pass runs it again (the hooks bring it back then);
- backward pass: when the block two positions earlier is recomputed (the backward of a block is complete by
  then), and any left over at the start of the next forward pass.

Frozen weights are never copied back (the host copy is still right); trained weights (full fine-tuning) are
copied back when the block was on the device during a backward pass (the optimizer may have changed them
there, with ``--fused_backward_pass`` / ``--blockwise_fused_optimizers``), not after a forward pass alone.
The hooks work the same with a CPU "device": the tests run the machinery on CPU
with ``poison=True`` (an offloaded weight is NaN), proving the weights are on the device whenever they are used.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class BlockSwap:
    """Hooks that stream the blocks at ``swapped`` (indices into ``blocks``, which are in execution order)."""

    def __init__(self, blocks: Sequence[torch.nn.Module], swapped: Sequence[int], device: torch.device | str, *,
                 checkpointing: bool, poison: bool = False):
        self.blocks = list(blocks)
        self.swapped = sorted(set(swapped))
        self.device = torch.device(device)
        self.checkpointing = checkpointing
        self.poison = poison
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.host: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}  # (tensor, host, parked)
        self.resident: dict[int, Any] = {}  # swapped blocks on the device -> the event of their copy (CUDA)
        self.dirty: set[int] = set()  # resident blocks that were on the device during a backward pass
        self.handles: list[Any] = []
        for i in self.swapped:
            self.host[i] = [self._park(t) for t in self._tensors(self.blocks[i])]
            self.handles.append(self.blocks[i].register_forward_pre_hook(self._before(i)))
            self.handles.append(self.blocks[i].register_forward_hook(self._after(i)))

    @staticmethod
    def _tensors(block: torch.nn.Module) -> list[torch.Tensor]:
        return [*block.parameters(), *block.buffers()]

    def _park(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        host = t.detach().to("cpu", copy=True)
        if self.stream is not None:
            host = host.pin_memory()
        parked = torch.full_like(host, float("nan")) if self.poison and host.is_floating_point() else host
        t.data = parked
        return t, host, parked

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a tensor of a swapped block (kept off the device by :meth:`place`)."""
        return any(t is entry[0] for entries in self.host.values() for entry in entries)

    # ------------------------------------------------------------------ moves

    def _fetch(self, i: int) -> None:
        if i not in self.host or i in self.resident:
            return
        if self.stream is None:
            for t, host, _ in self.host[i]:
                t.data = host.to(self.device, copy=True)
            self.resident[i] = None
            return
        with torch.cuda.stream(self.stream):
            for t, host, _ in self.host[i]:
                t.data = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.resident[i] = event

    def _ready(self, i: int) -> None:
        self._fetch(i)
        event = self.resident[i]
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t, _, _ in self.host[i]:
                t.data.record_stream(current)  # allocated on the side stream, used on this one
            self.resident[i] = None

    def _offload(self, i: int) -> None:
        if i not in self.resident:
            return
        self._ready(i)
        for t, host, parked in self.host[i]:
            if i in self.dirty and t.requires_grad:  # trained weights may have changed on the device
                host.copy_(t.data)
            t.data = parked
        del self.resident[i]
        self.dirty.discard(i)

    # ------------------------------------------------------------------ hooks

    def _before(self, i: int) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            if _in_backward():  # recomputation in reverse order: later blocks are done
                for j in [j for j in self.resident if j > i + 1]:
                    self._offload(j)
                self._ready(i)
                self.dirty.add(i)
                self._fetch(self._neighbour(i, -1))
            else:
                if self._may_release():
                    for j in [j for j in self.resident if j < i]:
                        self._offload(j)
                self._ready(i)
                self._fetch(self._neighbour(i, +1))
        return hook

    def _after(self, i: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not _in_backward() and self._may_release():
                self._offload(i)
        return hook

    def _may_release(self) -> bool:
        """Outside the backward pass a block's weights may leave once it ran: nothing records them for a
        backward pass (no gradients, or checkpointed blocks that the backward pass runs again)."""
        return not torch.is_grad_enabled() or self.checkpointing

    def _neighbour(self, i: int, step: int) -> int:
        j = i + step
        return j if 0 <= j < len(self.blocks) else -1

    # ------------------------------------------------------------------ model placement

    def place(self, model: torch.nn.Module, dtype: torch.dtype | None) -> None:
        """Move every tensor of ``model`` except those of the swapped blocks to the device (float8 ones keep
        their dtype, others become ``dtype``); the swapped blocks' host copies get ``dtype`` too."""
        from library.models.fp8 import FP8_DTYPES

        def convert(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
            if dtype is None or t.dtype in FP8_DTYPES or not t.is_floating_point():
                return t.to(device)
            return t.to(device, dtype)

        for t in [*model.parameters(), *model.buffers()]:
            if not self.owns(t):
                t.data = convert(t.data, self.device)
        for i, entries in self.host.items():
            fresh = []
            for t, host, _ in entries:
                t.data = convert(host, "cpu")
                fresh.append(self._park(t))
            self.host[i] = fresh

    def adopt_casts(self) -> None:
        """Give the host copies the dtype a later cast gave the swapped tensors (``--full_bf16`` / ``--full_fp16``
        cast the trained weights after the hooks are set; the host copies would otherwise bring the old dtype
        back at the first fetch). Call while no swapped block is on the device."""
        for i, entries in self.host.items():
            fresh = []
            for t, host, parked in entries:
                if t.dtype != host.dtype:
                    t.data = host.to(t.dtype)
                    fresh.append(self._park(t))
                else:
                    fresh.append((t, host, parked))
            self.host[i] = fresh

    def release_all(self) -> None:
        """Send every swapped block back to the host (after a step whose backward pass stopped early)."""
        for i in list(self.resident):
            self._offload(i)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
