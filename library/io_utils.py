"""Atomic file writes: a reader sees the old file or the new one, never a half-written one."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def match_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions of a new file or folder
    under the umask: temporary files and folders (``mkstemp``, ``mkdtemp``, safetensors' own writer) are
    private (0600/0700), which a finished output must not stay."""
    umask = os.umask(0o022)
    os.umask(umask)
    path = Path(path)
    if path.is_dir():
        os.chmod(path, 0o777 & ~umask)
        for folder, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(folder, name), 0o777 & ~umask)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~umask)
    else:
        os.chmod(path, 0o666 & ~umask)


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        match_umask(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_save_file(path: str | os.PathLike, save: Callable[[str], None]) -> None:
    """Call ``save(tmp_path)`` (e.g. ``safetensors.torch.save_file``) and move the result into place."""
    _atomic_write(path, save)


def replace_folder(new: Path, target: Path) -> None:
    """Move the folder ``new`` to ``target``; an existing ``target`` is moved aside first and removed only
    afterwards."""
    if not target.exists():
        new.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    old.rmdir()
    target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        old.rename(target)
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def atomic_save_folder(path: str | os.PathLike, save: Callable[[Path], None]) -> None:
    """Call ``save(tmp_folder)`` (e.g. a transformers ``save_pretrained``) and move the folder into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        save(tmp)
        match_umask(tmp)
        replace_folder(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# --- where outputs may go: checked before any work starts ---------------------------------------------------

_STALE_TEMPORARY = re.compile(r"^\.(?P<name>.+?)(?:\.[A-Za-z0-9_]{8}\.(?:tmp|old)|\.partial|\.old)$")


def output_dir_problem(path: str | os.PathLike, option: str) -> str | None:
    """Why ``path`` cannot be (created and) written as an output folder, or None when it can.

    Checked before any model loads, so that a run never trains for hours and then fails at its first save:
    a path that is a file or lies under a file, or whose nearest existing folder is not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{option} {path} is a file, not a folder; give a folder (it is created if missing)"
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{option} {path} lies under {existing}, which is a file, not a folder; give another folder"
    if not _can_write(existing):
        where = "" if existing == path else f" (its nearest existing folder {existing})"
        return f"{option} {path}{where} is not writable; choose a folder you can write to or fix its permissions"
    return None


def check_output_file(path: str | os.PathLike, option: str, *, overwrite: bool, example: str = "output") -> Path:
    """Refuse an output file path that is a folder, lies under a file, is in an unwritable folder, or exists
    without ``overwrite`` (UserError naming ``option``; ``example`` is a file name to suggest); returns it."""
    from library.errors import UserError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name (e.g. {path / example})")
    problem = output_dir_problem(path.parent if str(path.parent) else Path("."), f"{option}: the folder of")
    if problem:
        raise UserError(problem)
    if path.exists() and not overwrite:
        raise UserError(f"{option} {path} already exists; it is not replaced unless you pass --overwrite "
                        "(or choose another name)")
    return path


def _can_write(folder: Path) -> bool:
    """Try it: ``os.access`` says yes to root even on a read-only file system."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def remove_stale_temporaries(folder: str | os.PathLike, owns: Callable[[str], bool]) -> list[Path]:
    """Delete the hidden temporaries that our atomic writers leave when killed (``.<name>.<random>.tmp`` /
    ``.old`` files or folders, ``.<name>.partial``), but only those whose ``<name>`` this caller ``owns``
    (a run's own output names), so a concurrent writer of other files is never disturbed. Returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        m = _STALE_TEMPORARY.match(entry.name)
        if not m or not owns(m.group("name")):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed
