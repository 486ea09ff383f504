"""Fine-tuning metadata JSON files: reading, writing and keying images.

A metadata file maps an image key to its entry: ``{"caption": ..., "tags": ..., "train_resolution": [w, h]}``.
Keys are the full image path (``--full_path``) or the path relative to the image folder without its
extension (``img1``, ``sub/img2``), which is what sd-scripts writes and what the dataset code resolves
back to the image by trying the image extensions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from library.dataset.image_files import list_images
from library.errors import UserError
from library.io_utils import atomic_write_json, check_output_file


def load_metadata(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a metadata JSON file; a broken file is a :class:`UserError` naming the line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: metadata file not found.") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a metadata file.") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the metadata file ({err.strerror or err}).") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}).") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}.") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UserError(f"{path}: expected a JSON object mapping image keys to objects like {{\"caption\": \"...\"}}.")
    return data


def save_metadata(path: str | Path, metadata: dict[str, dict[str, Any]]) -> None:
    atomic_write_json(path, metadata, indent=2)


def image_keys(images: list[Path], root: Path, full_path: bool) -> dict[Path, str]:
    """The metadata key of each image. Full-path keys are absolute (a relative folder given on the command
    line would tie the file to the working directory); relative keys drop the extension unless two images
    would collide."""
    if full_path:
        return {p: str(p.resolve()) for p in images}
    stems: dict[str, int] = {}
    for p in images:
        rel = p.relative_to(root).with_suffix("").as_posix()
        stems[rel] = stems.get(rel, 0) + 1
    keys = {}
    for p in images:
        rel = p.relative_to(root).with_suffix("").as_posix()
        keys[p] = rel if stems[rel] == 1 else p.relative_to(root).as_posix()
    return keys


def find_entry_key(metadata: dict[str, Any], image: Path, root: Path, preferred: str) -> str:
    """The key already used for ``image`` in ``metadata`` (full path, relative, or stem form), else ``preferred``."""
    rel = image.relative_to(root)
    for candidate in (preferred, str(image), str(image.resolve()), rel.with_suffix("").as_posix(), rel.as_posix()):
        if candidate in metadata:
            return candidate
    return preferred


def merge_text_files(
    train_data_dir: str | Path,
    out_json: str | Path,
    *,
    field: str,
    extension: str,
    in_json: str | Path | None = None,
    full_path: bool = False,
    recursive: bool = False,
    debug: bool = False,
) -> tuple[int, list[Path]]:
    """Put the text of each image's ``<stem><extension>`` file into ``metadata[key][field]``.

    Starts from ``in_json`` (or ``out_json`` when it exists), writes ``out_json`` atomically. Returns the
    number of entries written and the images whose text file is missing (they are skipped).
    """
    root = Path(train_data_dir)
    if not root.is_dir():
        raise UserError(f"{root}: image folder not found.")
    check_output_file(out_json, "out_json", overwrite=True, example="meta.json")  # updated in place if it exists
    if not extension.startswith("."):
        extension = "." + extension
    source = Path(in_json) if in_json else Path(out_json)
    metadata = load_metadata(source) if (in_json or source.exists()) else {}
    images = list_images(root, recursive=recursive)
    if not images:
        raise UserError(f"{root}: no images (.png .jpg .jpeg .webp .bmp) found{' below it' if recursive else ''}.")
    keys = image_keys(images, root, full_path)
    missing: list[Path] = []
    written = 0
    for image in images:
        text_file = image.with_suffix(extension)
        if not text_file.is_file():
            missing.append(image)
            continue
        try:
            text = text_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as err:
            raise UserError(f"{text_file}: not UTF-8 text ({err.reason} at byte {err.start}).") from None
        key = find_entry_key(metadata, image, root, keys[image])
        metadata.setdefault(key, {})[field] = text
        written += 1
        if debug:
            print(f"{key}: {text}")
    save_metadata(out_json, metadata)
    return written, missing


def merge_cli(argv: list[str] | None, *, field: str, default_extension: str, description: str) -> int:
    """Command line of ``merge_captions_to_metadata.py`` and ``merge_dd_tags_to_metadata.py``."""
    from library.cli import ArgumentParser

    p = ArgumentParser(description=description)
    p.add_argument("train_data_dir", help=f"folder with the images and their {default_extension} files")
    p.add_argument("out_json", help="metadata file to write (updated in place if it exists and --in_json is not given)")
    p.add_argument("--in_json", default=None, help="metadata file to start from (it is not modified)")
    p.add_argument("--full_path", action="store_true", help="key entries by the full image path")
    p.add_argument("--recursive", action="store_true", help="also look in subfolders")
    p.add_argument("--caption_extension", "--caption_extention", dest="caption_extension", default=default_extension,
                   help=f"extension of the text files (default {default_extension})")
    p.add_argument("--debug", action="store_true", help="print every entry")
    args = p.parse_args(argv)
    written, missing = merge_text_files(
        args.train_data_dir, args.out_json, field=field, extension=args.caption_extension,
        in_json=args.in_json, full_path=args.full_path, recursive=args.recursive, debug=args.debug,
    )
    for image in missing:
        print(f"skipped {image}: no {image.with_suffix(args.caption_extension).name}")
    skipped = f" ({len(missing)} images without a {args.caption_extension} file skipped)" if missing else ""
    print(f"wrote {written} {field} entries to {args.out_json}{skipped}")
    return 0
