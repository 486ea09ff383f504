"""The dataset's plain types, shared by the group, the batch builder, the latent cache and the plan (a leaf
module: it imports none of them, so they import it, and the group, without a circle).

``DatasetGroupView`` is what those modules read from a :class:`library.dataset.group.DatasetGroup`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from library.config.params import DatasetParams, SubsetParams
from library.dataset.buckets import BucketChoice
from library.dataset.records import ImageRecord


def seed_words(*values: int) -> list[int]:
    """Entropy for ``numpy.random.SeedSequence`` from any ints (negative seeds included)."""
    return [int(v) % (1 << 64) for v in values]


@dataclass
class DatasetImage:
    """An image as trained: its record, subset, bucket choice, repeats and loss weight."""

    record: ImageRecord
    subset_index: int
    choice: BucketChoice
    repeats: int
    loss_weight: float
    is_reg: bool


@dataclass
class SubsetSummary:
    """Counts for the plan."""

    origin: str
    kind: str
    is_reg: bool
    source: str
    num_images: int  # readable images of the subset (after the validation split, for training)
    num_repeats: int
    num_samples: int  # images x repeats actually used per epoch (after reg balancing)
    num_used: int  # images used (reg balancing may leave some out)
    num_validation: int = 0


@dataclass
class ImageDataset:
    """One ``[[datasets]]`` entry (its training part, or its validation part)."""

    index: int
    params: DatasetParams
    images: list[DatasetImage]
    subsets: list[SubsetSummary]
    is_validation: bool = False
    notes: list[str] = field(default_factory=list)
    buckets: dict[tuple[int, int], list[int]] = field(init=False)

    def __post_init__(self) -> None:
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(self.images):
            buckets.setdefault(img.choice.bucket, []).extend([i] * img.repeats)
        self.buckets = dict(sorted(buckets.items()))

    @property
    def batch_size(self) -> int:
        return self.params.batch_size

    @property
    def subset_params(self) -> list[SubsetParams]:
        return self.params.subsets

    def num_batches(self) -> int:
        bs = self.batch_size
        return sum(math.ceil(len(v) / bs) for v in self.buckets.values())

    def num_samples(self) -> int:
        return sum(len(v) for v in self.buckets.values())

    def epoch_batches(self, seed: int, epoch: int) -> list[tuple[int, ...]]:
        """This dataset's batches (tuples of image indices) for ``epoch``; validation sets are not shuffled."""
        rng = None if self.is_validation else np.random.default_rng(seed_words(seed, epoch, self.index, 1))
        out: list[tuple[int, ...]] = []
        bs = self.batch_size
        for samples in self.buckets.values():
            order = samples if rng is None else [samples[i] for i in rng.permutation(len(samples))]
            out += [tuple(order[i : i + bs]) for i in range(0, len(order), bs)]
        return out

    def mean_ar_error(self) -> float:
        if not self.images:
            return 0.0
        return float(np.mean([abs(img.choice.ar_error) for img in self.images]))


@dataclass(frozen=True)
class BatchRef:
    """A batch to load: which images, and where it sits in the epoch (seeds its random choices)."""

    epoch: int
    index: int  # position in the epoch's full batch order (before splitting between processes)
    dataset: int
    samples: tuple[int, ...]
    validation: bool = False
    step: int = 0  # global optimizer step this batch contributes to


class DatasetGroupView(Protocol):
    """The parts of a ``DatasetGroup`` that batches, the latent cache and the plan read."""

    train: list[ImageDataset]
    validation: list[ImageDataset]
    latents: Any
    max_train_steps: int | None
    caption_templates: tuple[str, ...]

    notes: list[str]
    skipped: list[str]
    num_train_images: int
    num_reg_images: int

    def datasets(self, validation: bool = False) -> list[ImageDataset]: ...

    def total_batches(self, validation: bool = False) -> int: ...

    def batches_per_epoch(self, num_processes: int = 1, *, validation: bool = False) -> int: ...

    def steps_per_epoch(self, num_processes: int = 1, grad_accum: int = 1) -> int: ...
