"""Names of the files a run writes, the never-overwrite rule, and pruning of old intermediate saves.

Names follow sd-scripts: ``<name>.<ext>`` (final), ``<name>-000001.<ext>`` (after epoch 1),
``<name>-step00000100.<ext>`` (after step 100); states add ``-state`` (``<name>-state`` at the end).

Rule: a new run refuses to start when ``output_dir`` already holds weights or states with its
``output_name`` (from an earlier run), unless ``--overwrite`` (replace them) or ``--resume`` (a resumed run
continues and may replace the files of its own later steps).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError


@dataclass(frozen=True)
class OutputNames:
    output_dir: Path
    name: str
    ext: str  # without dot: safetensors, ckpt, pt; empty for folders (diffusers models)

    @property
    def suffix(self) -> str:
        return f".{self.ext}" if self.ext else ""

    def final(self) -> Path:
        return self.output_dir / f"{self.name}{self.suffix}"

    def epoch(self, epoch: int) -> Path:
        return self.output_dir / f"{self.name}-{epoch:06d}{self.suffix}"

    def step(self, step: int) -> Path:
        return self.output_dir / f"{self.name}-step{step:08d}{self.suffix}"

    def final_state(self) -> Path:
        return self.output_dir / f"{self.name}-state"

    def epoch_state(self, epoch: int) -> Path:
        return self.output_dir / f"{self.name}-{epoch:06d}-state"

    def step_state(self, step: int) -> Path:
        return self.output_dir / f"{self.name}-step{step:08d}-state"

    def _pattern(self, kind: str, state: bool) -> re.Pattern[str]:
        name = re.escape(self.name)
        number = r"(\d{6})" if kind == "epoch" else r"step(\d{8})"
        tail = "-state" if state else re.escape(self.suffix)
        return re.compile(rf"^{name}-{number}{tail}$")

    def existing(self) -> list[Path]:
        """Files and state folders of this output name already in ``output_dir``."""
        if not self.output_dir.is_dir():
            return []
        found = []
        patterns = [self._pattern(k, s) for k in ("epoch", "step") for s in (False, True)]
        for path in sorted(self.output_dir.iterdir()):
            if path in (self.final(), self.final_state()) or any(p.match(path.name) for p in patterns):
                found.append(path)
        return found

    def numbered(self, kind: str, state: bool) -> dict[int, Path]:
        """Existing epoch or step saves (weights or states) by number."""
        if not self.output_dir.is_dir():
            return {}
        pattern = self._pattern(kind, state)
        result = {}
        for path in self.output_dir.iterdir():
            m = pattern.match(path.name)
            if m:
                result[int(m.group(1))] = path
        return result


def check_output_dir(names: OutputNames, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start over an earlier run's files (see module docstring)."""
    if resume or overwrite:
        return
    found = names.existing()
    if found:
        shown = ", ".join(p.name for p in found[:5]) + (" ..." if len(found) > 5 else "")
        raise UserError(f"{names.output_dir} already has files of a run named '{names.name}' ({shown}); nothing was "
                        "changed. Use another --output_name or --output_dir, --resume <state folder> to continue "
                        "that run, or --overwrite to replace its files")


def remove_save(path: Path) -> None:
    """Delete a saved file or folder (diffusers folders and state folders are folders)."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def prune(names: OutputNames, kind: str, *, state: bool, keep_after: int) -> list[Path]:
    """Delete epoch/step saves numbered ``<= keep_after``; returns what was deleted."""
    removed = []
    for number, path in sorted(names.numbered(kind, state).items()):
        if number <= keep_after:
            remove_save(path)
            removed.append(path)
    return removed
