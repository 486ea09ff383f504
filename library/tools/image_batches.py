"""Shared plumbing of the captioning tools: finding the work, reading images, batching, devices."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from itertools import islice
from typing import Callable, Generic, Iterable, Iterator, TypeVar

import torch
from tqdm import tqdm
from PIL import Image

from library.dataset.image_files import list_images
from library.errors import UserError

T = TypeVar("T")


def find_images(folder: str | Path, recursive: bool) -> list[Path]:
    """The images to process, or a UserError naming the folder when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist or is not a folder")
    images = list_images(folder, recursive)
    if not images:
        hint = "" if recursive else " (add --recursive to search its sub-folders)"
        raise UserError(f"no images (.png .jpg .jpeg .webp .bmp) found in {folder}{hint}")
    return images


def pending_images(images: list[Path], has_output: Callable[[Path], bool], overwrite: bool) -> tuple[list[Path], int]:
    """Images still to do and how many were skipped because they already have an output."""
    if overwrite:
        return images, 0
    todo = [p for p in images if not has_output(p)]
    return todo, len(images) - len(todo)


def open_rgb(path: Path, background: tuple[int, int, int] | None = None) -> Image.Image:
    """Read an image fully and return it as RGB; transparency is composited on ``background`` when given."""
    with Image.open(path) as img:
        img.load()
        if background is not None and (img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, background + (255,))
            canvas.alpha_composite(rgba)
            return canvas.convert("RGB")
        return img.convert("RGB")


@dataclass
class Loaded(Generic[T]):
    path: Path
    data: T
    size: tuple[int, int]


@dataclass
class BatchReader(Generic[T]):
    """Reads images in background threads and yields batches; unreadable images are reported and skipped.

    ``load(path) -> (data, (width, height))``. Skipped images are listed in ``failed``.
    """

    load: Callable[[Path], tuple[T, tuple[int, int]]]
    batch_size: int
    workers: int = 2
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def _safe_load(self, path: Path) -> Loaded[T] | str:
        try:
            data, size = self.load(path)
        except Exception as err:  # any decoder error means "this file is not a usable image"
            return f"{type(err).__name__}: {err}"
        return Loaded(path, data, size)

    def batches(self, paths: Iterable[Path], progress: tqdm | None = None) -> Iterator[list[Loaded[T]]]:
        """Yield lists of up to ``batch_size`` loaded images, reading a bounded window ahead. A skipped image
        advances ``progress`` (the caller advances it for the images it processes)."""
        batch: list[Loaded[T]] = []
        window = max(2 * self.batch_size, 2 * self.workers)
        queue: deque[tuple[Path, Future]] = deque()
        remaining = iter(paths)
        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            for path in islice(remaining, window):
                queue.append((path, pool.submit(self._safe_load, path)))
            while queue:
                path, future = queue.popleft()
                item = future.result()
                for nxt in islice(remaining, 1):
                    queue.append((nxt, pool.submit(self._safe_load, nxt)))
                if isinstance(item, str):
                    self.failed.append((path, item))
                    tqdm.write(f"skipping {path}: cannot read the image ({item})")
                    if progress is not None:
                        progress.update(1)
                    continue
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_positive(name: str, value: int) -> None:
    if value < 1:
        raise UserError(f"{name} must be at least 1 (got {value})")


def summary(done: int, skipped_existing: int, failed: list[tuple[Path, str]], what: str, *, blocked: int = 0) -> str:
    parts = [f"{done} {what} written"]
    if skipped_existing:
        parts.append(f"{skipped_existing} skipped (already done; --overwrite redoes them)")
    if blocked:
        parts.append(f"{blocked} skipped (their output path is not writable, listed above)")
    if failed:
        parts.append(f"{len(failed)} unreadable: " + ", ".join(str(p) for p, _ in failed))
    return "; ".join(parts)
