"""Outputs get the permissions of any new file under the umask, not the private modes of temporary files."""

from __future__ import annotations

import os
import stat

import torch
from safetensors.torch import save_file

from library.io_utils import atomic_save_file, atomic_write_text, match_umask


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "hello")
        atomic_save_file(tmp_path / "w.safetensors", lambda tmp: save_file({"x": torch.zeros(1)}, tmp))
        os.umask(0o027)
        atomic_write_text(tmp_path / "b.txt", "hello")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "a.txt") == 0o644 and _mode(tmp_path / "w.safetensors") == 0o644
    assert _mode(tmp_path / "b.txt") == 0o640
    assert (tmp_path / "a.txt").read_text() == "hello" and not list(tmp_path.glob(".*tmp"))


def test_match_umask_on_a_private_folder(tmp_path):
    folder = tmp_path / "state"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "f.bin").write_bytes(b"x")
    os.chmod(folder / "sub" / "f.bin", 0o600)
    os.chmod(folder, 0o700)
    previous = os.umask(0o022)
    try:
        match_umask(folder)
    finally:
        os.umask(previous)
    assert (_mode(folder), _mode(folder / "sub"), _mode(folder / "sub" / "f.bin")) == (0o755, 0o755, 0o644)
