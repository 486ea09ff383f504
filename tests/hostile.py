"""The machinery of ``tests/test_hostile_inputs.py``: one shared setup, one row type, one runner.

A :class:`Case` is a command line (a script and its arguments, with ``{placeholders}``) that must fail
cleanly: non-zero exit, the expected message fragment, no ``Traceback``, and not one pre-existing file
changed or removed in the folders involved. :func:`check_case` runs one; :class:`Setup` holds the shared
demo files (built once per session by the ``hostile_setup`` fixture).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import runpy
import shlex
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Setup:
    """The files every row may use (read-only: a row that needs to change one copies it into ``{W}``)."""

    root: Path  # everything below is in here
    model: Path  # {M}: tiny SD1 diffusers folder
    images: Path  # {IMG}: four captioned 64x64 images (red, green, blue, yellow; .txt captions)
    dataset: Path  # {DS}: dataset TOML over {IMG} (resolution 64, batch 2, num_repeats 2)
    run: Path  # {OUT}: a finished LoRA run named "l" (l.safetensors, l-step00000002.safetensors, states)
    state: Path  # {STATE}: {OUT}/l-step00000002-state, a LoRA state at step 2

    def placeholders(self, work: Path) -> dict[str, str]:
        tn = (f"train_network.py --pretrained_model_name_or_path {self.model} --network_dim 4 --learning_rate 1e-3 "
              "--max_train_steps 2 --seed 0 --max_data_loader_n_workers 0 --output_name l")
        return {"M": str(self.model), "IMG": str(self.images), "DS": str(self.dataset), "OUT": str(self.run),
                "STATE": str(self.state), "W": str(work), "TN": tn, "PY": "python"}


@dataclass(frozen=True)
class Case:
    """One hostile command. ``command`` starts with the script (``train_network.py``,
    ``finetune/merge_captions_to_metadata.py``, or ``{TN}``), placeholders in braces.
    ``setup(work, setup)`` prepares files in the row's own folder ``work`` ({W}) before the run.
    ``forbid`` lists fragments that must NOT appear (e.g. advice that would be harmful).
    ``subprocess``: run as a separate ``python`` process (default: in this process, much faster)."""

    id: str
    command: str
    expect: str
    setup: Callable[[Path, Setup], None] | None = None
    forbid: tuple[str, ...] = ()
    subprocess: bool = False
    slow: bool = False
    watch: tuple[str, ...] = field(default_factory=tuple)  # extra folders to hash (placeholders allowed)


def build_setup(root: Path, model: Path) -> Setup:
    """The issue's setup (``demo.py --steps 2`` files) plus one finished LoRA run with states."""
    import demo
    import train_network

    images = root / "images"
    demo.make_images(images)
    dataset = root / "dataset.toml"
    dataset.write_text("[general]\nresolution = 64\ncaption_extension = \".txt\"\nbatch_size = 2\n\n[[datasets]]\n\n"
                       f"  [[datasets.subsets]]\n  image_dir = '{images.as_posix()}'\n  num_repeats = 2\n",
                       encoding="utf-8")
    run = root / "run"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train_network.main(["--pretrained_model_name_or_path", str(model), "--dataset_config", str(dataset),
                            "--output_dir", str(run), "--output_name", "l", "--network_dim", "4",
                            "--learning_rate", "1e-3", "--max_train_steps", "3", "--seed", "0",
                            "--max_data_loader_n_workers", "0", "--save_every_n_steps", "2", "--save_state"])
    return Setup(root=root, model=model, images=images, dataset=dataset, run=run, state=run / "l-step00000002-state")


def expand(command: str, values: dict[str, str]) -> list[str]:
    """``{TN}`` and other placeholders replaced, then split like a shell would."""
    for _ in range(2):  # {TN} itself holds placeholders
        command = command.format(**values)
    return shlex.split(command)


def file_hashes(folders: list[Path]) -> dict[Path, str]:
    """SHA-256 of every file below ``folders``."""
    out: dict[Path, str] = {}
    for folder in folders:
        if folder.is_file():
            out[folder] = hashlib.sha256(folder.read_bytes()).hexdigest()
            continue
        for dirpath, _, names in os.walk(folder):
            for name in names:
                path = Path(dirpath) / name
                if path.is_file():
                    out[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_command(argv: list[str], *, cwd: Path, in_process: bool, timeout: float = 300) -> tuple[int, str]:
    """(exit status, stdout + stderr) of ``python argv...``; in this process unless told otherwise. An
    exception escaping the script is printed with its traceback (what a user would have seen)."""
    script = ROOT / argv[0]
    if not in_process:
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        done = subprocess.run([sys.executable, str(script), *argv[1:]], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
        return done.returncode, done.stdout + done.stderr
    out = io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = [str(script), *argv[1:]]
    os.chdir(cwd)
    code: int | str | None = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                runpy.run_path(str(script), run_name="__main__")
            except SystemExit as exit_:
                code = exit_.code
            except BaseException:  # noqa: BLE001 - a traceback is exactly what the row must not show
                traceback.print_exc(file=out)
                code = 1
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return (code if isinstance(code, int) else 1), out.getvalue()


def check_case(case: Case, setup: Setup, work: Path) -> str:
    """Run one row and assert its promises; returns the output (for extra assertions)."""
    work.mkdir(parents=True, exist_ok=True)
    values = setup.placeholders(work)
    if case.setup is not None:
        case.setup(work, setup)
    watched = [setup.root, work] + [Path(w.format(**values)) for w in case.watch]
    before = file_hashes(watched)
    code, output = run_command(expand(case.command, values), cwd=work, in_process=not case.subprocess)
    after = file_hashes(watched)
    changed = sorted(str(p) for p, digest in before.items() if after.get(p) != digest)
    assert "Traceback" not in output, f"[{case.id}] traceback:\n{output[-3000:]}"
    assert code != 0, f"[{case.id}] exit status 0; output:\n{output[-2000:]}"
    assert case.expect in output, f"[{case.id}] expected {case.expect!r} in:\n{output[-2000:]}"
    for fragment in case.forbid:
        assert fragment not in output, f"[{case.id}] {fragment!r} must not appear in:\n{output[-2000:]}"
    assert not changed, f"[{case.id}] pre-existing files changed or removed: {changed}"
    return output


# --- helpers for rows' setup functions --------------------------------------------------------------------

def copy_state(source: Path, target: Path, edit: Callable[[Path], None]) -> Path:
    """A copy of a state folder, changed by ``edit(folder)`` and re-hashed (its manifest matches again): what
    a user editing a state by hand would produce."""
    shutil.copytree(source, target)
    edit(target)
    manifest = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
    manifest["files"] = {name: hashlib.sha256((target / name).read_bytes()).hexdigest()
                         for name in manifest["files"]}
    (target / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return target


def edit_progress(folder: Path, **fields: object) -> None:
    """Set fields of a state's ``train_state.json``."""
    path = folder / "train_state.json"
    info = json.loads(path.read_text(encoding="utf-8"))
    info.update(fields)
    path.write_text(json.dumps(info), encoding="utf-8")


def write_code_pickle(path: Path) -> Path:
    """A torch file whose pickle would call ``os.system`` when loaded without ``weights_only``."""
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))

    torch.save({"weight": torch.zeros(1), "payload": Payload()}, path)
    return path
