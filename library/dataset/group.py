"""Datasets of a run: records -> buckets, repeats, regularization balance, validation split, batches.

A *dataset* (one ``[[datasets]]`` entry) owns its images, each assigned to a bucket. Each epoch every bucket's
sample list (each image ``repeats`` times) is shuffled and cut into batches of ``batch_size`` (the last one of
a bucket may be smaller), so batches never mix buckets and there are ``sum(ceil(len(bucket) / batch_size))``
batches per dataset. The batches of all datasets are then shuffled together. All shuffles are seeded from
``(seed, epoch)``, so any epoch's batches can be recomputed (resume, several processes).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from library.config.params import (
    DatasetGroupParams,
    DatasetParams,
    DreamBoothSubsetParams,
    FineTuningSubsetParams,
    SubsetParams,
)
from library.dataset.buckets import BucketManager, ImageTooSmallError
from library.dataset.items import BatchRef, DatasetImage, ImageDataset, SubsetSummary, seed_words
from library.dataset.latent_cache import LatentStore
from library.dataset.plan import format_plan
from library.dataset.records import ImageRecord, SubsetScan, scan_dreambooth_subset, scan_finetuning_subset
from library.errors import UserError

if TYPE_CHECKING:
    import torch

_MAX_PRINTED_SKIPS = 20


class DatasetGroup:
    """All datasets of a run (training and validation parts), with their plan and latent cache."""

    def __init__(
        self,
        train: list[ImageDataset],
        validation: list[ImageDataset],
        *,
        seed: int,
        skipped: list[str],
        notes: list[str],
        max_train_steps: int | None = None,
    ):
        self.train = train
        self.validation = validation
        self.seed = seed
        self.skipped = skipped
        self.notes = notes
        self.max_train_steps = max_train_steps
        self.latents: LatentStore | None = None
        # textual inversion's --use_object_template / --use_style_template: each caption becomes one of these
        self.caption_templates: tuple[str, ...] = ()

    @property
    def num_train_images(self) -> int:
        """Training images times repeats (as sd-scripts counts them), regularization images excluded."""
        return sum(s.num_images * s.num_repeats for d in self.train for s in d.subsets if not s.is_reg)

    @property
    def num_reg_images(self) -> int:
        """Regularization images times their configured repeats, before balancing."""
        return sum(s.num_images * s.num_repeats for d in self.train for s in d.subsets if s.is_reg)

    def set_max_train_steps(self, max_train_steps: int) -> None:
        """The run's total optimizer steps, for ``token_warmup_step`` given as a ratio (< 1)."""
        self.max_train_steps = max_train_steps

    def datasets(self, validation: bool = False) -> list[ImageDataset]:
        return self.validation if validation else self.train

    def epoch_batches(self, seed: int, epoch: int, *, validation: bool = False) -> list[BatchRef]:
        """Every batch of ``epoch`` in order: per-dataset bucket batches, shuffled together from (seed, epoch)."""
        refs = [
            BatchRef(epoch=epoch, index=0, dataset=ds_i, samples=s, validation=validation)
            for ds_i, ds in enumerate(self.datasets(validation))
            for s in ds.epoch_batches(seed, epoch)
        ]
        if not validation:
            order = np.random.default_rng(seed_words(seed, epoch, 0)).permutation(len(refs))
            refs = [refs[i] for i in order]
        return [
            BatchRef(epoch=r.epoch, index=i, dataset=r.dataset, samples=r.samples, validation=validation)
            for i, r in enumerate(refs)
        ]

    def total_batches(self, validation: bool = False) -> int:
        return sum(d.num_batches() for d in self.datasets(validation))

    def batches_per_epoch(self, num_processes: int = 1, *, validation: bool = False) -> int:
        """Batches each process loads per epoch (the batch list is padded to a multiple of ``num_processes``)."""
        return math.ceil(self.total_batches(validation) / max(1, num_processes))

    def steps_per_epoch(self, num_processes: int = 1, grad_accum: int = 1) -> int:
        """Optimizer steps per epoch: a final partial accumulation group still makes a step."""
        return math.ceil(self.batches_per_epoch(num_processes) / max(1, grad_accum))

    def fingerprint(self) -> str:
        """A short hash of what decides the batches: every training image (path, size), its repeats, and
        each dataset's resolution and batch size. Stored in states to warn when a run resumes on other data."""
        h = hashlib.sha256()
        for ds in self.train:
            h.update(f"{ds.params.resolution}|{ds.batch_size}\n".encode())
            for img in ds.images:
                h.update(f"{img.record.path}|{img.record.size}|{img.repeats}\n".encode())
        return h.hexdigest()[:16]

    def fixed_captions(self) -> list[str]:
        """Every caption the training and validation batches carry, once each, when captions never vary
        (no shuffle, dropout, token warmup or wildcards: ``text_cache.caption_variation_reasons`` is empty)."""
        import random

        from library.dataset.captions import process_caption

        captions: dict[str, None] = {}
        for ds in self.train + self.validation:
            for img in ds.images:
                sub = ds.subset_params[img.subset_index]
                caption = process_caption(img.record.caption, sub, rng=random.Random(0), epoch=1, step=0,
                                          max_train_steps=self.max_train_steps)
                captions[caption] = None
        return list(captions)

    def latent_cacheable(self) -> list[str]:
        """Why latents cannot be cached (empty: they can): options that change the image every step."""
        reasons = []
        for ds in self.train + self.validation:
            for sub in ds.subset_params:
                bad = [name for name, on in (("random_crop", sub.random_crop), ("color_aug", sub.color_aug),
                                             ("face_crop_aug_range", sub.face_crop_aug_range)) if on]
                if bad:
                    reasons.append(f"{sub.origin}: {', '.join(bad)} change the image every step")
        return sorted(set(reasons))

    def cache_latents(
        self,
        encode: Callable[["torch.Tensor"], "torch.Tensor"],
        *,
        cache_key: str,
        to_disk: bool,
        batch_size: int,
        process_index: int = 0,
        num_processes: int = 1,
        recompute: bool = False,
        family_suffix: str = "_sd",
    ) -> None:
        """Encode every image once (see :mod:`library.dataset.latent_cache`); batches then carry ``latents``.

        With ``to_disk`` and several processes each process encodes its share (item ``i`` by process
        ``i % num_processes``); call this on every process and wait for all before loading batches.
        ``recompute`` re-encodes images whose disk entry is still valid.
        """
        reasons = self.latent_cacheable()
        if reasons:
            raise UserError(
                "latents cannot be cached with these dataset options (remove --cache_latents or the options):\n"
                + "\n".join(f"  - {r}" for r in reasons)
            )
        store = LatentStore(cache_key=cache_key, to_disk=to_disk, family_suffix=family_suffix)
        store.build(self, encode, batch_size=batch_size, process_index=process_index, num_processes=num_processes,
                    recompute=recompute)
        self.latents = store

    def plan(self, num_processes: int = 1, grad_accum: int = 1, epochs: int | None = None,
             steps: int | None = None, family: Any = None) -> str:
        """A human-readable summary of the model family (a ``ModelFamily``, when given), images, repeats, buckets
        and steps (see :mod:`library.dataset.plan`)."""
        return format_plan(self, num_processes=num_processes, grad_accum=grad_accum, epochs=epochs, steps=steps,
                           family=family)


def _split_validation(records: list[ImageRecord], split: float, seed: int, dataset_index: int,
                      subset_index: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Disjoint (train, validation) parts; ``floor(n * split)`` images go to validation, chosen from the seed."""
    n_val = int(math.floor(len(records) * split + 1e-9))
    if split <= 0 or n_val == 0:
        return records, []
    perm = np.random.default_rng(seed_words(seed, dataset_index, subset_index)).permutation(len(records))
    val_idx = set(perm[:n_val].tolist())
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


def balance_regularization(num_train_samples: int, reg: list[DatasetImage]) -> list[DatasetImage]:
    """sd-scripts' balancing: register reg images in order until they match the training samples.

    First pass: each reg image with its subset's repeats; further passes: one more repeat each, in order,
    until the count reaches ``num_train_samples``. Returns the images used (their ``repeats`` updated).
    """
    used: list[DatasetImage] = []
    if not reg:
        return used
    n = 0
    first_loop = True
    while n < num_train_samples:
        for img in reg:
            if first_loop:
                used.append(img)
                n += img.repeats
            else:
                img.repeats += 1
                n += 1
            if n >= num_train_samples:
                break
        first_loop = False
    return used


# bytes per sample of an epoch's plan (bucket lists, shuffles, batch tuples) and per batch (its references)
_PLAN_BYTES_PER_SAMPLE = 40
_PLAN_BYTES_PER_BATCH = 300


def check_plan_memory(params: DatasetParams, num_samples: int, available: int | None = None) -> None:
    """Refuse a plan (images x num_repeats) whose sample lists would take more than half the available
    memory, before they are built: the process would otherwise be killed by the system with no message."""
    need = num_samples * _PLAN_BYTES_PER_SAMPLE + -(-num_samples // params.batch_size) * _PLAN_BYTES_PER_BATCH
    available = available_memory() if available is None else available
    if available is None or need <= available // 2:
        return
    repeats = ", ".join(f"{sub.origin}: num_repeats = {sub.num_repeats}" for sub in params.subsets)
    raise UserError(f"{params.origin}: {num_samples:,} samples per epoch (images x num_repeats; {repeats}) would "
                    f"need about {need / 2**30:.1f} GiB of memory just to plan the epochs, more than half of the "
                    f"{available / 2**30:.1f} GiB available; lower num_repeats (an epoch that long is never "
                    "needed: use more epochs or --max_train_steps instead)")


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (MemAvailable on Linux), None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _scan(subset: SubsetParams, max_workers: int | None) -> SubsetScan:
    if isinstance(subset, FineTuningSubsetParams):
        return scan_finetuning_subset(subset, max_workers=max_workers)
    if isinstance(subset, DreamBoothSubsetParams):
        return scan_dreambooth_subset(subset, max_workers=max_workers)
    raise TypeError(f"unknown subset type {type(subset).__name__}")


def _source(subset: SubsetParams) -> str:
    if isinstance(subset, FineTuningSubsetParams):
        return subset.metadata_file
    return str(subset.image_dir)


def _build_dataset(index: int, params: DatasetParams, scans: list[SubsetScan], *, validation_seed: int,
                   skipped: list[str], required_step: int) -> tuple[ImageDataset, ImageDataset | None]:
    manager = BucketManager.from_params(params, required_step=required_step)

    def assign(records: list[ImageRecord], si: int, sub: SubsetParams, repeats: int) -> list[DatasetImage]:
        out = []
        for r in records:
            try:
                choice = manager.select_bucket(*r.size)
            except ImageTooSmallError as exc:
                skipped.append(f"{r.path}: {exc.message}; skipped")
                continue
            weight = params.prior_loss_weight if sub.is_reg else 1.0
            out.append(DatasetImage(r, si, choice, repeats, weight, sub.is_reg))
        return out

    train_imgs: list[DatasetImage] = []
    reg_imgs: list[DatasetImage] = []
    val_imgs: list[DatasetImage] = []
    summaries: list[SubsetSummary] = []
    val_summaries: list[SubsetSummary] = []
    for si, (sub, scan) in enumerate(zip(params.subsets, scans)):
        kind = "fine-tuning" if isinstance(sub, FineTuningSubsetParams) else "dreambooth"
        if sub.is_reg:
            tr, va = scan.records, []
        else:
            tr, va = _split_validation(scan.records, params.validation_split, validation_seed, index, si)
        imgs = assign(tr, si, sub, sub.num_repeats)
        vimgs = assign(va, si, sub, 1)
        (reg_imgs if sub.is_reg else train_imgs).extend(imgs)
        val_imgs.extend(vimgs)
        summaries.append(SubsetSummary(sub.origin, kind, sub.is_reg, _source(sub), len(imgs), sub.num_repeats,
                                       len(imgs) * sub.num_repeats, len(imgs), len(vimgs)))
        if vimgs:
            val_summaries.append(SubsetSummary(sub.origin, kind, False, _source(sub), len(vimgs), 1, len(vimgs),
                                               len(vimgs)))

    num_train_samples = sum(img.repeats for img in train_imgs)
    check_plan_memory(params, num_train_samples * (2 if reg_imgs else 1))
    used_reg = balance_regularization(num_train_samples, reg_imgs)
    notes: list[str] = []
    for s_i, summary in enumerate(summaries):
        if not summary.is_reg:
            continue
        mine = [img for img in used_reg if img.subset_index == s_i]
        summary.num_used = len(mine)
        summary.num_samples = sum(img.repeats for img in mine)
    unused = len(reg_imgs) - len(used_reg)
    if unused:
        notes.append(f"{unused} regularization image(s) not used: there are more than the training samples "
                     f"({num_train_samples}); raise the training subsets' num_repeats to use them")
    train = ImageDataset(index, params, train_imgs + used_reg, summaries, notes=notes)
    validation = None
    if val_imgs:
        validation = ImageDataset(index, params, val_imgs, val_summaries, is_validation=True)
    return train, validation


def build_dataset_group(params: DatasetGroupParams, *, seed: int, max_train_steps: int | None = None,
                        max_workers: int | None = None, required_step: int = 64) -> DatasetGroup:
    """Scan every subset, assign buckets, balance regularization images and split off validation images.

    Unreadable images are skipped and listed (printed here, and in :meth:`DatasetGroup.plan`).
    ``required_step`` is the model's bucket step (64 for SD1/2). Raises :class:`UserError` when no
    training image is left.
    """
    skipped: list[str] = list(params.skipped)
    notes: list[str] = []
    train: list[ImageDataset] = []
    validation: list[ImageDataset] = []
    for index, ds in enumerate(params.datasets):
        scans = [_scan(sub, max_workers) for sub in ds.subsets]
        for scan in scans:
            skipped.extend(scan.skipped)
            notes.extend(scan.notes)
        vseed = ds.validation_seed if ds.validation_seed is not None else seed
        tr, va = _build_dataset(index, ds, scans, validation_seed=vseed, skipped=skipped,
                                required_step=required_step)
        notes.extend(f"{ds.origin}: {n}" for n in tr.notes)
        train.append(tr)
        if va is not None:
            validation.append(va)
    group = DatasetGroup(train, validation, seed=seed, skipped=skipped, notes=notes,
                         max_train_steps=max_train_steps)
    found = skipped[len(params.skipped):]  # the config's own notes were already reported by the config
    if found:
        _print_skipped(found)
    if group.total_batches() == 0:
        where = ", ".join(str(_source(s)) for d in params.datasets for s in d.subsets) or params.source
        details = "".join(f"\n  - {n}" for n in notes + skipped)
        kinds = {d.kind for d in params.datasets}
        hints = []
        if "dreambooth" in kinds:
            hints.append("put the images (.png .jpg .jpeg .webp .bmp) directly in each image folder")
        if "finetuning" in kinds:
            hints.append("the metadata keys must name the images: absolute paths, or paths relative to image_dir "
                         "(--train_data_dir) with or without the extension")
        raise UserError(f"no training images found in {where}{details}\n  Fix: {'; '.join(hints)}")
    return group


def _print_skipped(skipped: list[str]) -> None:
    print(f"dataset: {len(skipped)} item(s) skipped:", file=sys.stderr)
    for s in skipped[:_MAX_PRINTED_SKIPS]:
        print(f"  {s}", file=sys.stderr)
    if len(skipped) > _MAX_PRINTED_SKIPS:
        print(f"  ... and {len(skipped) - _MAX_PRINTED_SKIPS} more (see the plan)", file=sys.stderr)

