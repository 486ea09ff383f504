"""The training loader: one item = one whole batch (a chunk of one bucket), loaded by DataLoader workers.

The batch order is computed in the main process (:meth:`DatasetGroup.epoch_batches`, from ``(seed, epoch)``)
and handed to the workers as :class:`~library.dataset.group.BatchRef` s; every random choice inside a batch
comes from ``(seed, epoch, batch index, sample index)``. So the data of a step depends neither on the number
of workers nor on whether the run was resumed. With several processes, process ``i`` gets batches
``i, i + N, ...`` of the epoch's list, padded (by wrapping around) so every process has the same count.

Epochs count from 0 (``set_epoch(0)`` is the first epoch; ``caption_dropout_every_n_epochs`` sees them
counted from 1, as in sd-scripts). A batch's ``step`` is the optimizer step it belongs to, counted from 0
over the whole run: ``epoch * steps_per_epoch + k // grad_accum`` for this process's ``k``-th batch.

Do not pass the loader to ``accelerator.prepare``: it already yields this process's share.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from library.dataset.group import DatasetGroup
from library.dataset.items import BatchRef
from library.dataset.samples import load_batch


class _BatchDataset(Dataset):
    """Map-style dataset whose keys are :class:`BatchRef` s."""

    def __init__(self, group: DatasetGroup, seed: int):
        self.group = group
        self.seed = seed

    def __getitem__(self, ref: BatchRef) -> dict[str, Any]:  # type: ignore[override]
        return load_batch(self.group, ref, seed=self.seed)


class _RefSampler(Sampler):
    """Yields the batch references of the current epoch (set by :meth:`EpochLoader.set_epoch`)."""

    def __init__(self) -> None:
        self.refs: list[BatchRef] = []

    def __iter__(self) -> Iterator[BatchRef]:
        return iter(list(self.refs))

    def __len__(self) -> int:
        return len(self.refs)


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class EpochLoader:
    """Iterates this process's batches of one epoch; call :meth:`set_epoch` before each epoch."""

    def __init__(self, group: DatasetGroup, *, seed: int, num_workers: int, persistent_workers: bool,
                 process_index: int = 0, num_processes: int = 1, grad_accum: int = 1, validation: bool = False):
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is not in 0..{num_processes - 1}")
        ratio_warmup = [s.origin for d in group.train for s in d.subset_params if 0 < s.token_warmup_step < 1]
        if ratio_warmup and group.max_train_steps is None:
            raise ValueError(f"token_warmup_step is a ratio in {', '.join(ratio_warmup)}: call "
                             f"group.set_max_train_steps() before making the loader")
        self.group = group
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self.grad_accum = max(1, grad_accum)
        self.validation = validation
        self.epoch = 0
        self.skip_batches = 0
        self._sampler = _RefSampler()
        workers = max(0, int(num_workers))
        self._loader = DataLoader(
            _BatchDataset(group, seed),
            batch_size=None,
            sampler=self._sampler,
            num_workers=workers,
            persistent_workers=bool(persistent_workers) and workers > 0,
            collate_fn=_identity,
            pin_memory=torch.cuda.is_available(),
            # its own generator: starting an epoch must not draw from the global RNG (exact resume); the
            # samples' randomness comes from (seed, epoch, batch, sample), not from the worker seeds
            generator=torch.Generator().manual_seed(seed),
        )
        self.set_epoch(0)

    def batches_per_epoch(self) -> int:
        return self.group.batches_per_epoch(self.num_processes, validation=self.validation)

    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch() / self.grad_accum)

    def epoch_refs(self, epoch: int) -> list[BatchRef]:
        """This process's batches of ``epoch`` (with their global ``step``), before ``skip_batches``."""
        refs = self.group.epoch_batches(self.seed, 0 if self.validation else epoch, validation=self.validation)
        if not refs:
            return []
        per_proc = self.batches_per_epoch()
        padded = [refs[i % len(refs)] for i in range(per_proc * self.num_processes)]
        mine = padded[self.process_index :: self.num_processes]
        base = 0 if self.validation else epoch * self.steps_per_epoch()
        return [dataclasses.replace(r, step=base + k // self.grad_accum) for k, r in enumerate(mine)]

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select ``epoch`` (from 0); skip its first ``skip_batches`` batches (resume inside an epoch)."""
        if skip_batches < 0:
            raise ValueError("skip_batches must be >= 0")
        self.epoch = epoch
        self.skip_batches = skip_batches
        self._sampler.refs = self.epoch_refs(epoch)[skip_batches:]

    def __len__(self) -> int:
        """Batches of a full epoch for this process (``skip_batches`` not subtracted)."""
        return self.batches_per_epoch()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._loader)


def make_train_loader(group: DatasetGroup, *, seed: int, num_workers: int, persistent_workers: bool,
                      process_index: int = 0, num_processes: int = 1, grad_accum: int = 1,
                      validation: bool = False) -> EpochLoader:
    """The loader of the training (or, with ``validation``, the validation) batches; see :class:`EpochLoader`.

    Validation batches are neither shuffled nor re-randomized per epoch: every pass sees the same data.
    Build the loader after :meth:`DatasetGroup.cache_latents` and :meth:`DatasetGroup.set_max_train_steps`.
    """
    return EpochLoader(group, seed=seed, num_workers=num_workers, persistent_workers=persistent_workers,
                       process_index=process_index, num_processes=num_processes, grad_accum=grad_accum,
                       validation=validation)
