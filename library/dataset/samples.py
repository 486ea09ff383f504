"""Building one batch: per sample image (or cached latents), caption and conditioning, then stacking.

Randomness: each sample gets two ``random.Random`` streams seeded from ``(seed, epoch, batch index, sample
index)``, one for the image (crop, colour, flip) and one for the caption, so a caption is the same whether
the latents are cached or not, and nothing depends on the worker that loads the batch.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from library.dataset.captions import process_caption
from library.dataset.items import BatchRef, DatasetGroupView, DatasetImage, ImageDataset, seed_words
from library.dataset.transforms import (
    ImageReadError,
    alpha_to_mask,
    color_aug,
    face_crop,
    fit_to_bucket,
    flip,
    load_image,
    parse_face_box,
    to_tensor,
)
from library.errors import UserError


logger = logging.getLogger(__name__)


def sample_rng(seed: int, epoch: int, batch_index: int, sample_index: int, stream: int) -> random.Random:
    """An independent RNG for one sample and purpose (0: image, 1: caption)."""
    state = np.random.SeedSequence(seed_words(seed, epoch, batch_index, sample_index, stream)).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


@dataclass
class PreparedImage:
    image: torch.Tensor  # (3, H, W) in [-1, 1]
    crop_ltrb: tuple[int, int, int, int]
    alpha_mask: torch.Tensor | None  # (H, W) in [0, 1]
    flipped: bool = False


def prepare_image(img: DatasetImage, ds: ImageDataset, rng: random.Random | None) -> PreparedImage:
    """Load, fit to the bucket, augment (when ``rng`` is given) and convert one image."""
    sub = ds.subset_params[img.subset_index]
    interpolation = sub.resize_interpolation or ds.params.resize_interpolation
    array = load_image(img.record.path, with_alpha=sub.alpha_mask)
    face = parse_face_box(img.record.path) if rng is not None and sub.face_crop_aug_range else None
    if face is not None:
        array, crop_ltrb = face_crop(array, face, sub.face_crop_aug_range, img.choice.bucket,
                                     random_crop=sub.random_crop, rng=rng, interpolation=interpolation)
    else:
        array, crop_ltrb = fit_to_bucket(array, img.choice, random_crop=rng is not None and sub.random_crop,
                                         rng=rng, interpolation=interpolation)
    if rng is not None and sub.color_aug:
        array = color_aug(array, rng=rng)
    flipped = rng is not None and sub.flip_aug and rng.random() < 0.5
    if flipped:
        array = flip(array)
    mask = alpha_to_mask(array) if sub.alpha_mask else None
    return PreparedImage(to_tensor(array), crop_ltrb, mask, flipped)


def prepare_for_cache(img: DatasetImage, ds: ImageDataset) -> PreparedImage:
    """The image as the latent cache encodes it: center crop, no augmentation, not flipped."""
    try:
        return prepare_image(img, ds, None)
    except ImageReadError as exc:
        raise UserError(f"{exc.message} (while caching latents)") from exc


def _prepare_or_substitute(ds: ImageDataset, img_index: int, image_rng: random.Random) -> tuple[int, PreparedImage]:
    """``(index, image)`` of ``img_index``, or, when that file cannot be decoded (its header was readable at
    scan time, its data is not), of another image of the same bucket picked with ``image_rng``; a warning
    names the broken file. A long run is not stopped by one damaged image; a bucket of only broken images is
    an error."""
    try:
        return img_index, prepare_image(ds.images[img_index], ds, image_rng)
    except ImageReadError as exc:
        first = exc
    bucket = ds.images[img_index].choice.bucket
    candidates = sorted({i for i in ds.buckets.get(bucket, []) if i != img_index})
    image_rng.shuffle(candidates)
    for other in candidates:
        try:
            prepared = prepare_image(ds.images[other], ds, image_rng)
        except ImageReadError:
            continue
        logger.warning("%s; using %s in its place in this batch", first.message, ds.images[other].record.path)
        return other, prepared
    raise UserError(f"{first.message}, and no other image of bucket {bucket[0]}x{bucket[1]} can be read either "
                    "(while loading a batch)")


def _crop_top_left(crop_ltrb: tuple[int, int, int, int], resized_w: int, flipped: bool) -> tuple[int, int]:
    """SDXL's crop conditioning (top, left) of the kept box; mirrored when the image was flipped."""
    left, top, right, _ = crop_ltrb
    if flipped:
        left = max(0, resized_w - right)
    return top, left


def load_batch(group: DatasetGroupView, ref: BatchRef, *, seed: int) -> dict[str, Any]:
    """The batch dict of ``ref`` (see docs/architecture.md, "Dataset -> trainer")."""
    ds = group.datasets(ref.validation)[ref.dataset]
    store = group.latents
    images: list[torch.Tensor] = []
    latents: list[torch.Tensor] = []
    masks: list[torch.Tensor | None] = []
    captions, paths, flipped_list = [], [], []
    orig_hw, crop_tl, target_hw = [], [], []
    used: list[int] = []
    for j, img_index in enumerate(ref.samples):
        image_rng = sample_rng(seed, ref.epoch, ref.index, j, 0)
        prep = None
        if store is None:
            img_index, prep = _prepare_or_substitute(ds, img_index, image_rng)
        used.append(img_index)
        img = ds.images[img_index]
        sub = ds.subset_params[img.subset_index]
        caption_rng = sample_rng(seed, ref.epoch, ref.index, j, 1)
        bw, bh = img.choice.bucket
        if store is not None:
            entry = store.get(ref.validation, ref.dataset, img_index)
            flipped = bool(sub.flip_aug) and image_rng.random() < 0.5
            lat = entry.latents_flipped if flipped else entry.latents
            if lat is None:
                raise UserError(f"latent cache for '{img.record.path}' has no flipped latents; recache")
            latents.append(lat)
            mask = entry.alpha_mask
            if mask is not None and flipped:
                mask = torch.flip(mask, dims=[1])
            masks.append(mask)
            crop_ltrb = entry.crop_ltrb
        else:
            images.append(prep.image)
            masks.append(prep.alpha_mask)
            flipped, crop_ltrb = prep.flipped, prep.crop_ltrb
        caption = process_caption(img.record.caption, sub, rng=caption_rng, epoch=ref.epoch + 1, step=ref.step,
                                  max_train_steps=group.max_train_steps)
        captions.append(caption_rng.choice(group.caption_templates) if group.caption_templates else caption)
        paths.append(str(img.record.path))
        flipped_list.append(flipped)
        orig_hw.append((img.record.size[1], img.record.size[0]))
        crop_tl.append(_crop_top_left(crop_ltrb, img.choice.resized[0], flipped))
        target_hw.append((bh, bw))

    n = len(ref.samples)
    batch: dict[str, Any] = {
        "captions": captions,
        "loss_weights": torch.tensor([ds.images[i].loss_weight for i in used], dtype=torch.float32),
        "network_multipliers": torch.full((n,), float(ds.params.network_multiplier), dtype=torch.float32),
        "alpha_masks": _stack_masks(masks, target_hw[0]),
        "original_sizes_hw": torch.tensor(orig_hw, dtype=torch.long),
        "crop_top_lefts": torch.tensor(crop_tl, dtype=torch.long),
        "target_sizes_hw": torch.tensor(target_hw, dtype=torch.long),
        "flipped": flipped_list,
        "image_paths": paths,
        "epoch": ref.epoch,
        "step": ref.step,
    }
    if store is not None:
        batch["latents"] = torch.stack(latents)
    else:
        batch["images"] = torch.stack(images)
    return batch


def _stack_masks(masks: list[torch.Tensor | None], target_hw: tuple[int, int]) -> torch.Tensor | None:
    """(B, H, W) masks, ones for samples without one; None when no sample has a mask."""
    if all(m is None for m in masks):
        return None
    ones = torch.ones(target_hw, dtype=torch.float32)
    return torch.stack([ones if m is None else m.float() for m in masks])
