"""The dataset plan: what will be trained, how often, in which buckets, and what was left out."""

from __future__ import annotations

import math
from typing import Any

from library.dataset.items import DatasetGroupView, ImageDataset


def _reso(wh: tuple[int, int]) -> str:
    return f"{wh[0]}x{wh[1]}"


def _bucket_mode(ds: ImageDataset) -> str:
    p = ds.params
    if not p.enable_bucket:
        return "no bucketing (every image resized and cropped to the resolution)"
    if p.bucket_no_upscale:
        return f"buckets from image sizes (bucket_no_upscale, step {p.bucket_reso_steps})"
    return f"buckets {p.min_bucket_reso}..{p.max_bucket_reso} step {p.bucket_reso_steps}"


def _dataset_lines(ds: ImageDataset) -> list[str]:
    p = ds.params
    role = "validation" if ds.is_validation else "training"
    lines = [
        f"Dataset {ds.index} ({p.origin}, {p.kind}, {role}): resolution {_reso(p.resolution)}, "
        f"batch size {p.batch_size}, {_bucket_mode(ds)}",
    ]
    if not ds.is_validation:
        lines.append(f"  network_multiplier {p.network_multiplier:g}, prior_loss_weight {p.prior_loss_weight:g}")
    for s in ds.subsets:
        tag = " [reg]" if s.is_reg else ""
        if s.is_reg:
            lines.append(
                f"  {s.origin}{tag} '{s.source}': {s.num_images} images x {s.num_repeats} repeats; balanced to "
                f"{s.num_samples} samples using {s.num_used} image(s)"
            )
        else:
            held = f", {s.num_validation} held out for validation" if s.num_validation else ""
            lines.append(
                f"  {s.origin}{tag} '{s.source}': {s.num_images} images x {s.num_repeats} repeats = "
                f"{s.num_images * s.num_repeats} samples{held}"
            )
    if not ds.is_validation and p.validation_split > 0:
        seed = f"validation_seed {p.validation_seed}" if p.validation_seed is not None else "the run's seed"
        lines.append(f"  validation_split {p.validation_split:g} (split with {seed})")
    lines.append(f"  buckets ({len(ds.buckets)}, mean |aspect error| {ds.mean_ar_error():.3f}):")
    bs = p.batch_size
    for reso, samples in ds.buckets.items():
        lines.append(f"    {_reso(reso):>9}: {len(samples):6d} samples, {math.ceil(len(samples) / bs):5d} batches")
    lines.append(f"  {ds.num_samples()} samples, {ds.num_batches()} batches per epoch")
    return lines


def format_plan(group: DatasetGroupView, *, num_processes: int = 1, grad_accum: int = 1, epochs: int | None = None,
                steps: int | None = None, family: Any = None) -> str:
    """The model family (a ``ModelFamily``: its ``plan_line``), then per dataset and subset: images, repeats,
    regularization balance, buckets; then steps and skips."""
    lines: list[str] = [family.plan_line()] if family is not None else []
    for ds in group.train + group.validation:
        lines += _dataset_lines(ds)
    total = group.total_batches()
    per_proc = group.batches_per_epoch(num_processes)
    spe = group.steps_per_epoch(num_processes, grad_accum)
    lines.append(
        f"Total: {group.num_train_images} training images (with repeats), {group.num_reg_images} regularization "
        f"images (with repeats, before balancing)"
    )
    lines.append(
        f"Batches per epoch: {total} in all; {per_proc} per process with {num_processes} process(es); "
        f"{spe} optimizer steps per epoch with gradient_accumulation_steps {grad_accum}"
    )
    if group.validation:
        lines.append(f"Validation: {group.total_batches(validation=True)} batches "
                     f"({group.batches_per_epoch(num_processes, validation=True)} per process)")
    if epochs is not None:
        lines.append(f"{epochs} epoch(s) -> {epochs * spe} optimizer steps")
    if steps is not None:
        lines.append(f"{steps} steps -> {math.ceil(steps / spe) if spe else 0} epoch(s)")
    if group.notes:
        lines.append("Notes:")
        lines += [f"  {n}" for n in group.notes]
    if group.skipped:
        lines.append(f"Skipped ({len(group.skipped)}):")
        lines += [f"  {s}" for s in group.skipped]
    else:
        lines.append("Skipped: nothing")
    return "\n".join(lines)
