"""Names of the files a run writes, the never-overwrite rule, and pruning of old intermediate saves.

Names follow sd-scripts: ``<name>.<ext>`` (final), ``<name>-000001.<ext>`` (after epoch 1),
``<name>-step00000100.<ext>`` (after step 100); states add ``-state`` (``<name>-state`` at the end).

Rule: a new run refuses to start when ``output_dir`` already holds weights or states with its
``output_name`` (from an earlier run), unless ``--overwrite`` (replace them) or ``--resume`` of that very run
(its state folder lies in ``output_dir`` and was saved with the same ``output_name``): a resumed run may
replace only its own files. Output names are plain names, never paths.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


MAX_NAME_BYTES = 200  # "<name>-step00000001-state" and ".<name>.safetensors.<random>.tmp" stay below 255


def output_name_problem(name: str, option: str = "--output_name") -> str | None:
    """Why ``name`` is not a plain file name (None when it is): output names are names, not paths, so a run
    never writes outside its ``--output_dir``."""
    if not name or not name.strip():
        return f"{option} must not be empty"
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("..") or "\0" in name:
        return (f"{option} '{name}' is a path; it must be a plain name (no '/', '\\' or '..'): put the folder "
                "in --output_dir and the name in --output_name")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return (f"{option} '{name[:40]}...' is too long ({len(name.encode('utf-8'))} bytes); its files and their "
                f"temporaries must fit the file system's 255-byte names, so use at most {MAX_NAME_BYTES} bytes")
    if name.startswith("."):
        return f"{option} '{name}' starts with a dot (hidden files are the toolkit's temporaries); drop the dot"
    return None


def output_problems(output_dir: str | Path | None, output_name: str) -> list[str]:
    """What is wrong with ``--output_dir``/``--output_name`` (checked before any model loads, by every
    trainer): a name that is a path, a folder that cannot be created or written."""
    from library.io_utils import output_dir_problem

    found = [output_name_problem(output_name)]
    if output_dir is not None:
        found.append(output_dir_problem(output_dir, "--output_dir"))
    return [p for p in found if p]


def check_output_dir(names: OutputNames, *, resume: str | Path | None, overwrite: bool) -> None:
    """Refuse to start over an earlier run's files (see module docstring). ``resume`` is the ``--resume``
    state folder (or None): a resumed run may replace only the files of the run it resumes, so the state must
    lie in ``output_dir`` and have been saved with this ``output_name``."""
    if isinstance(resume, bool):
        raise TypeError("check_output_dir(resume=...) takes the --resume folder (or None), not a bool")
    if overwrite:
        return
    found = names.existing()
    if not found:
        return
    shown = ", ".join(p.name for p in found[:5]) + (" ..." if len(found) > 5 else "")
    if resume:
        folder = Path(resume)
        same_dir = folder.resolve().parent == names.output_dir.resolve()
        saved_name = _saved_output_name(folder)
        if same_dir and saved_name == names.name:
            return
        why = "lies in another folder" if not same_dir else f"was saved with --output_name {saved_name!r}"
        raise UserError(f"{names.output_dir} already has files named '{names.name}' ({shown}) that the resumed "
                        f"run did not write (its state {folder} {why}); nothing was changed. Resume into the "
                        "folder and with the --output_name of the state's run, use another --output_name or "
                        "--output_dir, or delete those files")
    raise UserError(f"{names.output_dir} already has files of a run named '{names.name}' ({shown}); nothing was "
                    "changed. Use another --output_name or --output_dir, --resume <state folder> to continue "
                    "that run, or --overwrite to replace its files")


def _saved_output_name(state_folder: Path) -> str | None:
    """The ``output_name`` a state was saved with (None when unknown)."""
    import json

    try:
        info = json.loads((state_folder / "train_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info.get("output_name") if isinstance(info, dict) else None


def owns_temporary(names: OutputNames) -> Callable[[str], bool]:
    """Whether a hidden temporary named after ``<name>`` belongs to this run's outputs (for the clean-up of
    temporaries left by a killed run, :func:`library.io_utils.remove_stale_temporaries`)."""
    patterns = [names._pattern(k, s) for k in ("epoch", "step") for s in (False, True)]
    own = {names.final().name, names.final_state().name}
    return lambda name: name in own or any(p.match(name) for p in patterns)


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


def save_or_emergency(save: Callable[[Path], None], target: Path, names: OutputNames, step: int, *,
                      weights: Callable[[Path], None] | None = None) -> None:
    """``save(target)``; when that fails (disk full, folder removed or made read-only during the run), the
    trained weights are written by ``weights(path)`` (default: ``save``; a state's caller passes its weights
    saver) to an emergency file instead (the working folder, else the temporary folder) and a UserError says
    where, so hours of training are never lost to a failed save."""
    try:
        save(target)
        return
    except OSError as err:
        first = err
    save = weights or save
    name = f"{names.name}-emergency-step{step:08d}{names.suffix}"
    tried = []
    for folder in (Path.cwd(), Path(tempfile.gettempdir()), Path.home()):
        emergency = folder / name
        if emergency.exists():
            continue
        try:
            save(emergency)
        except OSError as err:
            tried.append(f"{emergency} ({err.strerror or err})")
            continue
        raise UserError(f"could not save {target} ({first.strerror or first}); the trained weights of step {step} "
                        f"were saved to {emergency} instead. Move that file where you want it; fix "
                        f"{names.output_dir} (space, permissions) before the next run")
    raise UserError(f"could not save {target} ({first.strerror or first}), nor an emergency copy: "
                    + "; ".join(tried))
