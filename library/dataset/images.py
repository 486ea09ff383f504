"""Image sizes without decoding, read in parallel, and the per-folder ``metadata_cache.json`` (``cache_info``).

Only the image header is read (``PIL.Image.open`` is lazy; EXIF rotation is applied to the size), so
scanning thousands of images costs well under a millisecond each. A file PIL cannot identify is reported
by name and skipped, never fatal.

``metadata_cache.json`` keeps the reference's layout (``{name: {"caption", "resolution"}}``) and adds the
file's ``mtime_ns`` and byte ``size`` (and those of its caption file), so an entry is used only while the image
and its caption file are unchanged; the reference never invalidates it.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

from tqdm import tqdm

from library.dataset.transforms import ImageReadError, read_image_size
from library.io_utils import atomic_write_json

METADATA_CACHE_NAME = "metadata_cache.json"
_CACHE_FORMAT = 2
_PROGRESS_FROM = 2000
T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Threads for header reads: IO bound, so more than the number of cores."""
    return min(32, (os.cpu_count() or 1) * 4)


def parallel_map(fn: Callable[[T], R], items: Sequence[T], *, max_workers: int | None = None,
                 chunk: int = 64, desc: str | None = None) -> list[R]:
    """``[fn(x) for x in items]`` on a thread pool, in chunks (one task per item costs more than a header read).

    With ``desc``, a progress bar is shown for long lists."""
    if not items:
        return []
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    workers = max(1, min(max_workers or default_workers(), len(chunks)))
    out: list[R] = []
    with tqdm(total=len(items), desc=desc, disable=desc is None or len(items) < _PROGRESS_FROM,
              leave=False) as bar:
        if workers == 1:
            parts: Iterable[list[R]] = ([fn(x) for x in c] for c in chunks)
            for part in parts:
                out += part
                bar.update(len(part))
            return out
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for part in pool.map(lambda c: [fn(x) for x in c], chunks):
                out += part
                bar.update(len(part))
    return out


def try_read_size(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """``(size, None)``, or ``(None, reason)`` for an unreadable image."""
    try:
        return read_image_size(path), None
    except ImageReadError as exc:
        return None, f"{exc.message} (skipped)"


def read_image_sizes(
    paths: Sequence[Path], *, max_workers: int | None = None
) -> tuple[dict[Path, tuple[int, int]], list[str]]:
    """Sizes of ``paths`` read in parallel; returns ``(sizes, skipped)`` where ``skipped`` names each bad file."""
    sizes: dict[Path, tuple[int, int]] = {}
    skipped: list[str] = []
    results = parallel_map(try_read_size, paths, max_workers=max_workers, desc="reading image sizes")
    for p, (size, err) in zip(paths, results):
        if size is None:
            skipped.append(str(err))
        else:
            sizes[p] = size
    return sizes, skipped


@dataclass(frozen=True)
class FileStamp:
    """What identifies a file version cheaply: modification time (ns) and size in bytes."""

    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: Path) -> "FileStamp | None":
        try:
            st = path.stat()
        except OSError:
            return None
        return cls(st.st_mtime_ns, st.st_size)


@dataclass
class InfoEntry:
    """A cached image size and caption-file text (``None``: the image had no caption file)."""

    size: tuple[int, int]
    caption: str | None
    image: FileStamp
    caption_file: str | None
    caption_stamp: FileStamp | None


class InfoCache:
    """``<image_dir>/metadata_cache.json``: image sizes and caption texts, checked per file against stamps."""

    def __init__(self, image_dir: Path):
        self.path = Path(image_dir) / METADATA_CACHE_NAME
        self.entries: dict[str, InfoEntry] = {}
        self.dirty = False
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # missing or unreadable: rebuilt from scratch and rewritten
        if not isinstance(data, dict):
            return
        for name, e in data.items():
            try:
                img = FileStamp(int(e["mtime_ns"]), int(e["bytes"]))
                cap = e.get("caption_stamp")
                self.entries[name] = InfoEntry(
                    size=(int(e["resolution"][0]), int(e["resolution"][1])),
                    caption=e["caption"] if isinstance(e.get("caption"), str) else None,
                    image=img,
                    caption_file=e.get("caption_file"),
                    caption_stamp=FileStamp(int(cap[0]), int(cap[1])) if cap else None,
                )
            except (KeyError, TypeError, ValueError, IndexError):
                continue  # reference-format or damaged entry: recomputed

    def lookup(self, image: Path, caption_file: Path) -> InfoEntry | None:
        """The entry for ``image`` if the image and its caption file are unchanged since it was written."""
        e = self.entries.get(image.name)
        if e is None or FileStamp.of(image) != e.image:
            return None
        if e.caption_file != caption_file.name or FileStamp.of(caption_file) != e.caption_stamp:
            return None
        return e

    def store(self, image: Path, size: tuple[int, int], caption: str | None, caption_file: Path) -> None:
        stamp = FileStamp.of(image)
        if stamp is None:
            return
        self.entries[image.name] = InfoEntry(
            size=size,
            caption=caption,
            image=stamp,
            caption_file=caption_file.name,
            caption_stamp=FileStamp.of(caption_file),
        )
        self.dirty = True

    def prune(self, keep: Iterable[str]) -> None:
        """Drop entries of images that no longer exist."""
        keep = set(keep)
        for name in [n for n in self.entries if n not in keep]:
            del self.entries[name]
            self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        out = {}
        for name, e in sorted(self.entries.items()):
            out[name] = {
                "caption": e.caption,
                "resolution": list(e.size),
                "mtime_ns": e.image.mtime_ns,
                "bytes": e.image.size,
                "caption_file": e.caption_file,
                "caption_stamp": [e.caption_stamp.mtime_ns, e.caption_stamp.size] if e.caption_stamp else None,
                "format": _CACHE_FORMAT,
            }
        try:
            atomic_write_json(self.path, out, indent=None)
        except OSError as exc:  # a read-only dataset folder must not stop training
            print(f"warning: cannot write {self.path} ({exc}); cache_info is not saved", file=sys.stderr)
            return
        self.dirty = False
