"""Image records of one subset: path, size and raw caption, from a DreamBooth folder or fine-tuning metadata.

Precomputed latents (``finetune/prepare_buckets_latents.py``) need no field here: that tool writes the same
``.npz`` files the latent cache writes beside each image (``library.dataset.latent_cache``), so a record's
latents are found from its ``path`` and bucket, and checked against the same key before use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from library.config.params import DreamBoothSubsetParams, FineTuningSubsetParams
from library.dataset.captions import read_caption_file
from library.dataset.image_files import IMAGE_EXTENSIONS, list_images
from library.dataset.images import InfoCache, parallel_map, read_image_sizes, try_read_size
from library.errors import UserError

_MAX_LISTED = 10


@dataclass
class ImageRecord:
    """One image of a subset. ``caption`` is the raw text (all lines; processing happens per step)."""

    path: Path
    size: tuple[int, int]  # (width, height) of the file
    caption: str


@dataclass
class SubsetScan:
    """The records of a subset and notes about what was skipped (shown in the plan)."""

    records: list[ImageRecord]
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _listing(items: list[str]) -> str:
    shown = "\n".join(f"    {s}" for s in items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return shown + more


def _require_dir(path: str | None, origin: str, what: str) -> Path:
    if not path:
        raise UserError(f"{origin}: {what} is not set; give the folder that contains the images")
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{origin}: {what} '{p}' is not a folder; check the path")
    return p


def _other_caption_extension(uncaptioned: list[Path], ext: str) -> str | None:
    """``.txt`` or ``.caption`` (the other common caption extension) when every image without a caption file
    has one of those instead: the usual sign of a wrong ``caption_extension``."""
    for other in (".txt", ".caption"):
        if other != ext and uncaptioned and all(p.with_name(p.stem + other).is_file() for p in uncaptioned):
            return other
    return None


def scan_dreambooth_subset(subset: DreamBoothSubsetParams, *, max_workers: int | None = None) -> SubsetScan:
    """Images of a DreamBooth folder with captions from ``<stem><caption_extension>`` or ``class_tokens``."""
    image_dir = _require_dir(subset.image_dir, subset.origin, "image_dir")
    paths = list_images(image_dir)
    cache = InfoCache(image_dir) if subset.cache_info else None
    ext = subset.caption_extension

    sizes: dict[Path, tuple[int, int]] = {}
    captions: dict[Path, str | None] = {}
    to_read: list[Path] = []
    for p in paths:
        entry = cache.lookup(p, p.with_name(p.stem + ext)) if cache else None
        if entry is None:
            to_read.append(p)
        else:
            sizes[p] = entry.size
            captions[p] = entry.caption

    def read(p: Path) -> tuple[tuple[int, int] | None, str | None, str | None]:
        size, err = try_read_size(p)
        cap_file = p.with_name(p.stem + ext)
        caption = read_caption_file(cap_file) if size is not None and cap_file.is_file() else None
        return size, err, caption

    skipped: list[str] = []
    for p, (size, err, caption) in zip(to_read, parallel_map(read, to_read, max_workers=max_workers,
                                                                   desc=f"scanning {image_dir.name}")):
        if size is None:
            skipped.append(str(err))
            continue
        sizes[p] = size
        captions[p] = caption
        if cache:
            cache.store(p, size, caption, p.with_name(p.stem + ext))
    if cache:
        cache.prune(p.name for p in sizes)
        cache.save()

    records: list[ImageRecord] = []
    missing: list[str] = []
    uncaptioned: list[Path] = []
    for p in paths:
        if p not in sizes:
            continue
        caption = captions.get(p)
        if caption is None:
            uncaptioned.append(p)
            if subset.class_tokens is None:
                missing.append(p.name)
                continue
            caption = subset.class_tokens
        records.append(ImageRecord(path=p, size=sizes[p], caption=caption))
    not_files = [c.name for c in (p.with_name(p.stem + ext) for p in uncaptioned) if c.exists()]
    if not_files:
        raise UserError(
            f"{subset.origin}: {len(not_files)} caption path(s) in '{image_dir}' are folders, not caption files:\n"
            f"{_listing(not_files)}\n  Rename or move those folders (their images would otherwise silently train "
            "without their captions)."
        )
    other_ext = _other_caption_extension(uncaptioned, ext)
    if missing:
        hint = (f" (they have '<name>{other_ext}' files: set caption_extension = '{other_ext}' if those are "
                "their captions)" if other_ext else "")
        raise UserError(
            f"{subset.origin}: {len(missing)} image(s) in '{image_dir}' have no caption file "
            f"('<name>{ext}') and the subset has no class_tokens:\n{_listing(missing)}\n"
            f"  Add caption files, set class_tokens, or fix caption_extension{hint}."
        )
    scan = SubsetScan(records=records, skipped=skipped)
    if other_ext:
        scan.notes.append(
            f"{subset.origin}: {len(uncaptioned)} image(s) without a '<name>{ext}' caption file are trained with "
            f"class_tokens {subset.class_tokens!r}, but they have '<name>{other_ext}' files; set "
            f"caption_extension = '{other_ext}' (--caption_extension {other_ext}) if those are their captions")
    if not paths:
        subdirs = sorted(d.name for d in image_dir.iterdir() if d.is_dir())
        hint = (f"; it has sub-folders ({', '.join(subdirs[:3])}): give the folder that holds the images"
                if subdirs else "")
        scan.notes.append(f"{subset.origin}: no images in '{image_dir}' ({', '.join(IMAGE_EXTENSIONS)}){hint}")
    return scan


def _read_metadata(path: Path, origin: str) -> list[tuple[str, dict]]:
    """(key, entry) pairs from a ``.json`` dict or a ``.jsonl`` file (``image_path`` is the key)."""
    if not path.is_file():
        raise UserError(f"{origin}: metadata_file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{origin}: cannot read metadata_file '{path}' as UTF-8 text ({exc})") from exc
    items: list[tuple[str, dict]] = []
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise UserError(f"{path}:{lineno}: invalid JSON ({exc})") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("image_path"), str):
                raise UserError(f"{path}:{lineno}: each line must be an object with a string 'image_path'")
            items.append((obj["image_path"], obj))
        return items
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{origin}: metadata_file '{path}' is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected an object {{image_key: {{caption, tags, ...}}}} at the top level")
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise UserError(f"{path}: entry '{key}' must be an object with 'caption' and/or 'tags'")
        items.append((key, entry))
    return items


def resolve_image_key(key: str, base: Path) -> Path | None:
    """An absolute path, a path relative to ``base`` (or else to the working directory) with its extension,
    or either of those without extension (a stem: the image extensions are tried)."""
    p = Path(key)
    roots = [p] if p.is_absolute() else [base / p, p]
    candidates = list(roots)
    if p.suffix.lower() not in IMAGE_EXTENSIONS:
        for stem in roots:
            candidates += [stem.with_name(stem.name + e) for e in IMAGE_EXTENSIONS]
            candidates += [stem.with_name(stem.name + e.upper()) for e in IMAGE_EXTENSIONS]
    for c in candidates:
        if c.is_file() and c.suffix.lower() in IMAGE_EXTENSIONS:
            return c
    return None


def _join_caption(entry: dict, subset: FineTuningSubsetParams) -> str | None:
    """``caption<sep> tags``; the tags go on every line of a multi-line caption, so that the line trained on
    (the first, or a random one with ``enable_wildcard``) has them. sd-scripts appends them to the last
    line only without ``enable_wildcard``, so training on the first line silently loses the tags."""
    caption = entry.get("caption")
    tags = entry.get("tags")
    caption = caption.strip() if isinstance(caption, str) and caption.strip() else None
    tags = tags.strip() if isinstance(tags, str) and tags.strip() else None
    if caption is None:
        return tags
    if tags is None:
        return caption
    sep = subset.caption_separator
    return "\n".join(f"{line}{sep} {tags}" for line in caption.split("\n"))


def _metadata_size(entry: dict) -> tuple[int, int] | None:
    s = entry.get("image_size")
    if isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s):
        return int(s[0]), int(s[1])
    return None


def scan_finetuning_subset(subset: FineTuningSubsetParams, *, max_workers: int | None = None) -> SubsetScan:
    """Images listed in a fine-tuning metadata file (JSON or JSONL); missing images are reported and skipped."""
    meta_path = Path(subset.metadata_file)
    if subset.image_dir:
        base = _require_dir(subset.image_dir, subset.origin, "image_dir")
    else:
        base = meta_path.parent
    items = _read_metadata(meta_path, subset.origin)
    skipped: list[str] = []
    resolved: list[tuple[Path, dict]] = []
    seen: set[Path] = set()
    for key, entry in items:
        p = resolve_image_key(key, base)
        if p is None:
            skipped.append(f"{meta_path}: '{key}': image not found (looked in '{base}'); skipped")
            continue
        if p in seen:
            skipped.append(f"{meta_path}: '{key}': same image as an earlier entry; skipped")
            continue
        seen.add(p)
        resolved.append((p, entry))

    need_size = [p for p, e in resolved if _metadata_size(e) is None]
    sizes, bad = read_image_sizes(need_size, max_workers=max_workers)
    skipped += bad
    records: list[ImageRecord] = []
    no_caption = 0
    for p, entry in resolved:
        size = _metadata_size(entry) or sizes.get(p)
        if size is None:
            continue
        caption = _join_caption(entry, subset)
        if caption is None:
            no_caption += 1
            caption = ""
        records.append(ImageRecord(path=p, size=size, caption=caption))
    scan = SubsetScan(records=records, skipped=skipped)
    if no_caption:
        scan.notes.append(f"{subset.origin}: {no_caption} image(s) have neither caption nor tags; trained with ''")
    if not items:
        scan.notes.append(f"{subset.origin}: metadata_file '{meta_path}' lists no images")
    return scan
