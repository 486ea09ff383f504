"""Where captions and tags go: sidecar text files, a JSONL file, or a JSON metadata file.

Every sink answers ``existing(image)`` (the text already stored for an image, or None) so the tools can skip
images that are done, and ``write(image, text, extra)``. Sidecar files and the JSON metadata file are written
atomically. The JSONL sink appends one flushed line per image so an interrupted run keeps its work and the
next run continues; a line cut off by a crash is dropped when the file is opened again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from library.errors import UserError
from library.io_utils import atomic_write_json, atomic_write_text, check_output_file


def _key(path: str | Path) -> str:
    return os.path.normcase(os.path.abspath(path))


class CaptionSink(Protocol):
    def existing(self, image: Path) -> str | None: ...

    def blocked(self, image: Path) -> str | None: ...

    def write(self, image: Path, text: str, extra: dict[str, Any] | None = None) -> None: ...

    def close(self) -> None: ...


class SidecarSink:
    """``<image stem><extension>`` next to each image."""

    def __init__(self, extension: str, trailing_newline: bool = True):
        if not extension.startswith("."):
            extension = "." + extension
        self.extension = extension
        self.trailing_newline = trailing_newline

    def path_for(self, image: Path) -> Path:
        return image.with_name(image.stem + self.extension)

    def existing(self, image: Path) -> str | None:
        path = self.path_for(image)
        if not path.is_file():
            return None
        return _read_text(path).strip()

    def blocked(self, image: Path) -> str | None:
        """Why the image's text file cannot be written (a folder of that name), or None."""
        path = self.path_for(image)
        return f"{path} is a folder, not a file" if path.exists() and not path.is_file() else None

    def write(self, image: Path, text: str, extra: dict[str, Any] | None = None) -> None:
        atomic_write_text(self.path_for(image), text + ("\n" if self.trailing_newline else ""))

    def close(self) -> None:
        pass


def without_blocked(images: list[Path], sink: CaptionSink) -> tuple[list[Path], list[str]]:
    """The images whose output can be written, and a line naming each one that cannot (it is skipped, the
    others are still captioned)."""
    keep, blocked = [], []
    for image in images:
        why = sink.blocked(image)
        if why:
            blocked.append(f"{image}: {why}; skipped (rename or remove it)")
        else:
            keep.append(image)
    return keep, blocked


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start}); choose another "
                        "output file") from err
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror})") from err


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The valid entries of a JSONL file and whether a cut-off or broken last line was dropped."""
    lines = _read_text(path).splitlines()
    entries: list[dict[str, Any]] = []
    dropped = False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                dropped = True
                break
            raise UserError(f"{path}: line {number} is not valid JSON ({err.msg}); fix or remove that line") from err
        if not isinstance(entry, dict) or "image_path" not in entry:
            raise UserError(f"{path}: line {number} has no \"image_path\"; this is not a captions JSONL file")
        entries.append(entry)
    return entries, dropped


class JsonlSink:
    """One ``{"image_path": ..., "<text_key>": ..., **extra}`` line per image, appended as it is produced."""

    def __init__(self, path: str | Path, text_key: str = "caption", option: str = "--output_file"):
        self.path = Path(path)
        self.text_key = text_key
        self.entries: dict[str, dict[str, Any]] = {}
        self.replaced = False
        check_output_file(self.path, option, overwrite=True, example="captions.jsonl")
        if self.path.is_file():
            entries, dropped = _read_jsonl(self.path)
            for entry in entries:
                self.entries[_key(entry["image_path"])] = entry
            if dropped:
                print(f"{self.path}: dropped an incomplete last line (an interrupted run); that image is redone")
                self._rewrite()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as err:
            raise UserError(f"{option} {self.path}: cannot be written ({err.strerror})") from err

    def blocked(self, image: Path) -> str | None:
        return None  # one file for all images, checked when opened

    def existing(self, image: Path) -> str | None:
        entry = self.entries.get(_key(image))
        return None if entry is None else str(entry.get(self.text_key, ""))

    def write(self, image: Path, text: str, extra: dict[str, Any] | None = None) -> None:
        key = _key(image)
        entry = {"image_path": str(image), self.text_key: text, **(extra or {})}
        self.replaced = self.replaced or key in self.entries
        self.entries[key] = entry
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def _rewrite(self) -> None:
        text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.entries.values())
        atomic_write_text(self.path, text)

    def close(self) -> None:
        """Close the file; if entries were replaced, rewrite it with one line per image (the newest)."""
        self._file.close()
        if self.replaced:
            self._rewrite()
            self.replaced = False


class JsonMetadataSink:
    """sd-scripts metadata JSON ``{image_path: {"<text_key>": ..., **extra}}``, merged into an existing file."""

    def __init__(self, path: str | Path, text_key: str = "tags", save_every: int = 100,
                 option: str = "--output_path"):
        self.path = Path(path)
        self.text_key = text_key
        self.save_every = save_every
        self.pending = 0
        self.metadata: dict[str, dict[str, Any]] = {}
        check_output_file(self.path, option, overwrite=True, example="meta.json")
        if self.path.is_file():
            try:
                data = json.loads(_read_text(self.path))
            except json.JSONDecodeError as err:
                raise UserError(f"{self.path}: not valid JSON ({err.msg} at line {err.lineno}); fix it or choose "
                                "another --output_path") from err
            if not isinstance(data, dict):
                raise UserError(f"{self.path}: expected a JSON object mapping image paths to entries")
            self.metadata = data
        self.index = {_key(k): k for k in self.metadata}

    def blocked(self, image: Path) -> str | None:
        return None  # one file for all images, checked when opened

    def existing(self, image: Path) -> str | None:
        name = self.index.get(_key(image))
        if name is None or self.text_key not in self.metadata[name]:
            return None
        return str(self.metadata[name][self.text_key])

    def write(self, image: Path, text: str, extra: dict[str, Any] | None = None) -> None:
        name = self.index.setdefault(_key(image), str(image))
        entry = self.metadata.setdefault(name, {})
        entry[self.text_key] = text
        entry.update(extra or {})
        self.pending += 1
        if self.pending >= self.save_every:
            self.flush()

    def flush(self) -> None:
        atomic_write_json(self.path, self.metadata, indent=4)
        self.pending = 0

    def close(self) -> None:
        if self.pending:
            self.flush()
