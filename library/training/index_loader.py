"""A data loader for recipes that bring their own dataset (captioners, VLMs): a list of samples, batched.

It has what the loop needs from ``run.loader``: ``len()`` (this process's batches per epoch), iteration, and
``set_epoch(epoch, skip_batches=n)``. The order of an epoch depends only on ``(seed, epoch)``, never on the
global RNGs, so a resumed run sees exactly the batches an uninterrupted run would have seen. Every process
gets the same number of batches (the shuffled order is padded by repeating its start), its share taken
round-robin.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import torch


class IndexEpochLoader:
    """``collate(samples) -> batch`` is called on each batch's samples in the main process."""

    def __init__(self, samples: Sequence[Any], collate: Callable[[list[Any]], Any], *, batch_size: int, seed: int,
                 shuffle: bool = True, process_index: int = 0, num_processes: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is not in 0..{num_processes - 1}")
        self.samples = samples
        self.collate = collate
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.num_processes = num_processes
        self.epoch = 0
        self.skip_batches = 0

    def _per_process(self) -> int:
        return math.ceil(len(self.samples) / self.num_processes)

    def __len__(self) -> int:
        return math.ceil(self._per_process() / self.batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip_batches = skip_batches

    def epoch_order(self) -> list[int]:
        """This process's sample indices for the current epoch, in order."""
        n = len(self.samples)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        total = self._per_process() * self.num_processes
        order = (order * math.ceil(total / max(n, 1)))[:total]
        return order[self.process_index::self.num_processes]

    def __iter__(self) -> Iterator[Any]:
        order = self.epoch_order()
        for b in range(self.skip_batches, len(self)):
            indices = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.collate([self.samples[i] for i in indices])
