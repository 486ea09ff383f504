"""Caption datasets: image/caption file pairs and the Hugging Face ``imagefolder`` ``metadata.jsonl``.

``metadata.jsonl`` has one ``{"file_name": ..., "text": ...}`` line per image, the path relative to the folder
holding the file (POSIX separators). The trainers read that file, or pair the images of a folder with their
caption files directly when it has none.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from library.dataset.image_files import list_images
from library.errors import UserError
from library.io_utils import atomic_write_text

METADATA_FILE = "metadata.jsonl"


@dataclass(frozen=True)
class CaptionPair:
    image: Path
    text: str


@dataclass
class PairScan:
    """Images paired with captions, and what could not be paired."""

    pairs: list[CaptionPair] = field(default_factory=list)
    images_without_caption: list[Path] = field(default_factory=list)
    captions_without_image: list[Path] = field(default_factory=list)
    empty_captions: list[Path] = field(default_factory=list)

    def report(self) -> str:
        """Lines naming every file that was left out (empty when none was)."""
        lines = []
        for title, paths in (("images without a caption file", self.images_without_caption),
                             ("caption files without an image", self.captions_without_image),
                             ("empty caption files", self.empty_captions)):
            if paths:
                lines.append(f"{len(paths)} {title} (left out): " + ", ".join(str(p) for p in paths))
        return "\n".join(lines)


def normalise_extension(extension: str) -> str:
    return extension if extension.startswith(".") else "." + extension


def read_caption_file(path: Path) -> str:
    """A caption file's text: its non-empty lines joined with spaces."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start}); save it as UTF-8") \
            from err
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def scan_pairs(folder: str | Path, caption_extension: str = ".txt") -> PairScan:
    """Pair every image below ``folder`` (recursively) with ``<stem><caption_extension>`` beside it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"dataset folder {folder} does not exist or is not a folder")
    extension = normalise_extension(caption_extension)
    scan = PairScan()
    stems = set()
    for image in list_images(folder, recursive=True):
        caption = image.with_name(image.stem + extension)
        stems.add(caption)
        if not caption.is_file():
            scan.images_without_caption.append(image)
            continue
        text = read_caption_file(caption)
        if text:
            scan.pairs.append(CaptionPair(image, text))
        else:
            scan.empty_captions.append(caption)
    scan.captions_without_image = sorted(p for p in folder.rglob(f"*{extension}")
                                         if p.is_file() and p not in stems and not p.name.startswith("."))
    return scan


def compile_metadata(dataset_dir: str | Path, output_dir: str | Path | None = None,
                     caption_extension: str = ".txt") -> tuple[Path, PairScan]:
    """Write ``metadata.jsonl`` (atomically) for the pairs below ``dataset_dir`` into ``output_dir`` (default:
    ``dataset_dir``); paths are relative to ``output_dir``. Raises UserError when nothing pairs up."""
    scan = scan_pairs(dataset_dir, caption_extension)
    if not scan.pairs:
        details = scan.report()
        raise UserError(f"{dataset_dir}: no image has a caption file ({normalise_extension(caption_extension)}); "
                        "nothing was written. Put <name>.txt beside each <name>.png (or set --caption_extension)"
                        + (f"\n{details}" if details else ""))
    out = Path(output_dir) if output_dir is not None else Path(dataset_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for pair in scan.pairs:
        relative = Path(os.path.relpath(pair.image.resolve(), out.resolve())).as_posix()
        lines.append(json.dumps({"file_name": relative, "text": pair.text}, ensure_ascii=False))
    path = out / METADATA_FILE
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path, scan


def read_metadata(path: Path) -> list[CaptionPair]:
    """The pairs of a ``metadata.jsonl``; every bad line is reported at once, naming the line."""
    pairs, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"line {number}: not valid JSON ({err.msg})")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) \
                or not isinstance(entry.get("text"), str):
            problems.append(f'line {number}: needs "file_name" and "text" strings')
            continue
        image = path.parent / entry["file_name"]
        if not image.is_file():
            problems.append(f"line {number}: image {entry['file_name']} does not exist (relative to {path.parent})")
            continue
        pairs.append(CaptionPair(image, entry["text"].strip()))
    if problems:
        raise UserError.from_problems(f"{path}: fix these lines (or rebuild it with finetune/compile_captions.py)",
                                      problems)
    if not pairs:
        raise UserError(f"{path} lists no images")
    return pairs


def load_pairs(dataset_dir: str | Path, caption_extension: str = ".txt") -> list[CaptionPair]:
    """The dataset's ``metadata.jsonl``, or (without one) its image/caption file pairs; prints what was left
    out."""
    folder = Path(dataset_dir)
    if (folder / METADATA_FILE).is_file():
        return read_metadata(folder / METADATA_FILE)
    scan = scan_pairs(folder, caption_extension)
    if not scan.pairs:
        raise UserError(f"{folder}: no {METADATA_FILE} and no image with a caption file "
                        f"({normalise_extension(caption_extension)}); run finetune/compile_captions.py {folder}")
    if scan.report():
        print(scan.report(), flush=True)
    return scan.pairs


def split_held_out(pairs: list[CaptionPair], fraction: float) -> tuple[list[CaptionPair], list[CaptionPair]]:
    """``(train, held_out)``: a fixed ``fraction`` of the pairs (at least one when there are two or more),
    chosen by a fixed seed so the held-out images are the same in every run and resume."""
    if fraction <= 0 or len(pairs) < 2:
        return list(pairs), []
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    count = min(len(pairs) - 1, max(1, round(len(pairs) * fraction)))
    held = set(order[:count])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]
