"""Latent cache: each image encoded once by the VAE, kept in memory or in an ``.npz`` beside the image.

Disk layout (sd-scripts' SD1/2 layout): ``<stem>_<WWWW>x<HHHH>_sd.npz`` where WWWWxHHHH is the original image
size, with ``latents`` (C,h,w) float32, ``original_size`` (w,h), ``crop_ltrb``, ``latents_flipped`` (with
``flip_aug``) and ``alpha_mask`` (H,W) (with ``alpha_mask``). We add ``cache_meta``, a JSON string naming what
the latents depend on: the VAE (``cache_key``), bucket, resized size, crop mode, flip, alpha mask,
interpolation, and the image content (byte size, mtime, SHA-256). An entry whose metadata does not match is
recomputed, so changing the image, the resolution/buckets or the VAE never reuses stale latents (the
reference reuses them). Files are written atomically.

When two entries of one run would share a file name (one image at two resolutions in two datasets, or
``a.png`` and ``a.jpg`` of the same size), the later one is stored as ``<stem>_<WWWW>x<HHHH>_<hash>_sd.npz``.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from library.dataset.items import DatasetGroupView, DatasetImage, ImageDataset
from library.dataset.samples import prepare_for_cache
from library.errors import UserError
from library.io_utils import atomic_write_bytes, file_sha256


CACHE_FORMAT = 1


@dataclass
class LatentEntry:
    """Cached latents of one image at one bucket (float32, CPU)."""

    latents: torch.Tensor  # (C, h, w)
    latents_flipped: torch.Tensor | None
    alpha_mask: torch.Tensor | None  # (H, W) in [0, 1]
    crop_ltrb: tuple[int, int, int, int]
    original_size: tuple[int, int]  # (w, h)


def npz_path(image_path: Path, original_size: tuple[int, int], variant: str | None = None,
             family_suffix: str = "_sd") -> Path:
    """``<stem>_<WWWW>x<HHHH>[_<variant>]<family suffix>.npz`` beside the image (``_sd`` for SD1.x/2.x,
    ``_sdxl`` for SDXL: caches of two families never mix, as with sd-scripts)."""
    w, h = original_size
    extra = f"_{variant}" if variant else ""
    return image_path.with_name(f"{image_path.stem}_{w:04d}x{h:04d}{extra}{family_suffix}.npz")


def content_stamp(path: Path, known: dict | None = None) -> dict:
    """``{"bytes", "mtime_ns", "sha256"}`` of a file; the hash is reused from ``known`` if size and mtime match."""
    st = path.stat()
    if known and known.get("bytes") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
        return dict(known)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}


def entry_key(img: DatasetImage, ds: ImageDataset, cache_key: str) -> dict:
    """What an image's latents depend on, besides its content."""
    sub = ds.subset_params[img.subset_index]
    return {
        "format": CACHE_FORMAT,
        "vae": cache_key,
        "bucket": list(img.choice.bucket),
        "resized": list(img.choice.resized),
        "crop": "center",
        "flip": bool(sub.flip_aug),
        "alpha_mask": bool(sub.alpha_mask),
        "interpolation": sub.resize_interpolation or ds.params.resize_interpolation,
    }


def _same_content(path: Path, stored: dict) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    if stored.get("bytes") != st.st_size:
        return False
    if stored.get("mtime_ns") == st.st_mtime_ns:
        return True
    return stored.get("sha256") == file_sha256(path)


def read_entry(npz: Path, key: dict, image_path: Path) -> LatentEntry | None:
    """The entry in ``npz`` if it exists, is readable, matches ``key`` and the image is unchanged; else None."""
    try:
        with np.load(npz, allow_pickle=False) as data:
            meta = json.loads(str(data["cache_meta"]))
            if meta.get("key") != key or not _same_content(image_path, meta.get("content", {})):
                return None
            latents = torch.from_numpy(np.array(data["latents"], dtype=np.float32))
            bw, bh = key["bucket"]
            if latents.ndim != 3 or tuple(latents.shape[1:]) != (bh // 8, bw // 8):
                return None
            flipped = torch.from_numpy(np.array(data["latents_flipped"], dtype=np.float32)) if key["flip"] else None
            mask = torch.from_numpy(np.array(data["alpha_mask"], dtype=np.float32)) if key["alpha_mask"] else None
            crop = tuple(int(v) for v in data["crop_ltrb"])
            orig = tuple(int(v) for v in data["original_size"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        return None
    if flipped is not None and flipped.shape != latents.shape:
        return None
    return LatentEntry(latents, flipped, mask, crop, orig)  # type: ignore[arg-type]


def write_entry(npz: Path, entry: LatentEntry, key: dict, content: dict) -> None:
    """Write ``entry`` atomically with its metadata."""
    arrays = {
        "latents": entry.latents.float().numpy(),
        "original_size": np.array(entry.original_size, dtype=np.int64),
        "crop_ltrb": np.array(entry.crop_ltrb, dtype=np.int64),
        "cache_meta": np.array(json.dumps({"key": key, "content": content}, sort_keys=True)),
    }
    if entry.latents_flipped is not None:
        arrays["latents_flipped"] = entry.latents_flipped.float().numpy()
    if entry.alpha_mask is not None:
        arrays["alpha_mask"] = entry.alpha_mask.float().numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(npz, buf.getvalue())


@dataclass
class _Item:
    """One distinct (image, key) to cache and the dataset images that use it."""

    image: DatasetImage
    dataset: ImageDataset
    key: dict
    users: list[tuple[bool, int, int]]  # (validation, dataset index in its list, image index)
    npz: Path | None = None


def _batch_key(item: _Item) -> tuple:
    """Items encoded together share the bucket (tensor shape) and whether a flipped pass is needed."""
    return item.image.choice.bucket, item.key["flip"]


class LatentStore:
    """Where every image's latents are: in memory, or in a checked ``.npz`` read when the batch is loaded."""

    def __init__(self, *, cache_key: str, to_disk: bool, family_suffix: str = "_sd"):
        self.family_suffix = family_suffix
        self.cache_key = cache_key
        self.to_disk = to_disk
        self.memory: dict[tuple[bool, int, int], LatentEntry] = {}
        self.disk: dict[tuple[bool, int, int], tuple[Path, dict, Path]] = {}

    def _items(self, group: DatasetGroupView) -> list[_Item]:
        items: dict[tuple[str, str], _Item] = {}
        for validation in (False, True):
            for ds_i, ds in enumerate(group.datasets(validation)):
                for img_i, img in enumerate(ds.images):
                    key = entry_key(img, ds, self.cache_key)
                    ident = (str(img.record.path), json.dumps(key, sort_keys=True))
                    item = items.setdefault(ident, _Item(img, ds, key, []))
                    item.users.append((validation, ds_i, img_i))
        ordered = [items[k] for k in sorted(items)]
        taken: dict[Path, tuple[str, str]] = {}
        for item in ordered:
            rec = item.image.record
            path = npz_path(rec.path, rec.size, family_suffix=self.family_suffix)
            ident = (rec.path.name, json.dumps(item.key, sort_keys=True))
            if taken.setdefault(path, ident) != ident:
                variant = hashlib.sha256("\n".join(ident).encode()).hexdigest()[:8]
                path = npz_path(rec.path, rec.size, variant, self.family_suffix)
            item.npz = path
        return ordered

    def build(self, group: DatasetGroupView, encode: Callable[[torch.Tensor], torch.Tensor], *, batch_size: int,
              process_index: int = 0, num_processes: int = 1, recompute: bool = False) -> None:
        """Load valid entries, encode the rest (this process's share when caching to disk), write them.

        ``recompute`` encodes and rewrites valid disk entries too."""
        items = self._items(group)
        todo: list[_Item] = []
        for i, item in enumerate(items):
            if self.to_disk:
                for user in item.users:
                    self.disk[user] = (item.npz, item.key, item.image.record.path)
                mine = i % max(1, num_processes) == process_index
                if mine and (recompute or read_entry(item.npz, item.key, item.image.record.path) is None):
                    todo.append(item)
            else:
                todo.append(item)
        todo.sort(key=lambda it: (_batch_key(it), str(it.image.record.path)))
        self._encode_all(todo, encode, max(1, batch_size))

    def _encode_all(self, todo: list[_Item], encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> None:
        batches: list[list[_Item]] = []
        for item in todo:
            last = batches[-1] if batches else None
            if last and len(last) < batch_size and _batch_key(last[0]) == _batch_key(item):
                batches[-1].append(item)
            else:
                batches.append([item])
        with ThreadPoolExecutor(max_workers=batch_size) as pool, tqdm(total=len(todo), desc="caching latents",
                                                                     disable=not todo) as bar:
            for batch in batches:
                prepared = list(pool.map(lambda it: prepare_for_cache(it.image, it.dataset), batch))
                images = torch.stack([p.image for p in prepared])
                with torch.no_grad():
                    latents = encode(images).detach().float().cpu()
                    flipped = None
                    if batch[0].key["flip"]:
                        flipped = encode(torch.flip(images, dims=[3])).detach().float().cpu()
                for j, (item, prep) in enumerate(zip(batch, prepared)):
                    entry = LatentEntry(
                        latents=latents[j].clone(),
                        latents_flipped=None if flipped is None else flipped[j].clone(),
                        alpha_mask=prep.alpha_mask,
                        crop_ltrb=prep.crop_ltrb,
                        original_size=item.image.record.size,
                    )
                    if self.to_disk:
                        write_entry(item.npz, entry, item.key, content_stamp(item.image.record.path))
                    else:
                        for user in item.users:
                            self.memory[user] = entry
                bar.update(len(batch))

    def get(self, validation: bool, dataset_index: int, image_index: int) -> LatentEntry:
        """The latents of one dataset image; a missing or stale disk entry is an error naming the file."""
        user = (validation, dataset_index, image_index)
        if user in self.memory:
            return self.memory[user]
        npz, key, image_path = self.disk[user]
        entry = read_entry(npz, key, image_path)
        if entry is None:
            raise UserError(
                f"latent cache '{npz}' for '{image_path}' is missing or out of date (the image or cache changed "
                f"during the run, or another process has not finished caching); run again to recompute it"
            )
        return entry
