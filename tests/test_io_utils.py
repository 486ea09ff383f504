"""Atomic writes leave files with the permissions of any new file."""

from __future__ import annotations

import os
import stat

from library.io_utils import atomic_write_text


def test_atomic_write_uses_the_umask_not_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "hello")
        os.umask(0o027)
        atomic_write_text(tmp_path / "b.txt", "hello")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o640
    assert (tmp_path / "a.txt").read_text() == "hello" and not list(tmp_path.glob(".*tmp"))
