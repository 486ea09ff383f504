"""How a training bench runs its cases: the shared command line, one process per case, the ``RESULT`` line.

The parent process (:func:`run_cases`) builds each model with ``<script> --build MODEL WORKDIR``, then runs every
case as ``<script> --steps N --case MODEL ... RESOLUTION WORKDIR`` in its own process (so peak memory does not mix
between cases); the child (:func:`serve_child`) prints one ``RESULT {json}`` line that :func:`run_case` reads back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def bench_parser(doc: str, models: Iterable[str], default_models: Iterable[str], case: tuple[str, ...], *,
                 variants: tuple[str, Iterable[str]] | None = None, build: bool = True) -> argparse.ArgumentParser:
    """The options of a training bench: ``--steps``, ``--models``, then (with ``variants``, a word and its names)
    ``--<word>s`` and ``--resolutions``, ``--json``, and the hidden ``--case`` (``case`` names its arguments) and
    ``--build`` of the child processes."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per case (default 6)")
    parser.add_argument("--models", nargs="*", default=list(default_models), choices=list(models))
    if variants is not None:
        word, names = variants
        parser.add_argument(f"--{word}s", nargs="*", default=None, choices=list(names),
                            help=f"default: every {word} this device runs")
        parser.add_argument("--resolutions", nargs="*", type=int, default=None, help="default: by device and model")
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    parser.add_argument("--case", nargs=len(case), metavar=case, help=argparse.SUPPRESS)
    if build:
        parser.add_argument("--build", nargs=2, metavar=("MODEL", "WORKDIR"), help=argparse.SUPPRESS)
    return parser


def bench_main(parser: argparse.ArgumentParser, script: str, prefix: str, *, build: Callable[[str, Path], None] | None,
               one_case: Callable[..., dict[str, Any]],
               cases: Callable[[argparse.Namespace, str, str], Iterable[tuple[str, ...]]],
               line: Callable[[dict[str, Any], str], str], builder: str | None = None, keep_going: bool = True) -> int:
    """A training bench from its command line (``parser``, from :func:`bench_parser`) to its exit status. In a child
    process: the ``--build`` or ``--case`` it was started for (:func:`serve_child`). Else: ``cases(args, device,
    model)`` of every ``--models`` model (:func:`run_cases`), printing ``line(result, device)``, then ``--json``;
    exit status 1 when a case failed (with ``keep_going=False``: at the first failure, nothing written)."""
    args = parser.parse_args()
    if serve_child(args, build, one_case):
        return 0
    device = bench_device()
    results, failed = run_cases(script, prefix, args.models, lambda model: cases(args, device, model), args.steps,
                                lambda result: line(result, device), builder=builder, keep_going=keep_going)
    if failed and not keep_going:
        return 1
    write_results(args.json, results)
    return 1 if failed else 0


def serve_child(args: argparse.Namespace, build: Callable[[str, Path], None] | None,
                one_case: Callable[..., dict[str, Any]]) -> bool:
    """Do the child's part when ``args`` asks for it: ``--build MODEL WORKDIR`` calls ``build(model, workdir)``;
    ``--case MODEL ... RESOLUTION WORKDIR`` sets :func:`bench_threads`, calls ``one_case(model, ..., resolution,
    steps, workdir)`` and prints its ``RESULT`` line. False when ``args`` asks for neither (this is the parent)."""
    if getattr(args, "build", None):
        name, work = args.build
        build(name, Path(work))
        return True
    if not args.case:
        return False
    import torch

    torch.set_num_threads(bench_threads())
    *head, resolution, work = args.case
    print("RESULT " + json.dumps(one_case(*head, int(resolution), args.steps, Path(work))), flush=True)
    return True


def bench_threads() -> int:
    """The CPU threads a case runs with: ``BENCH_THREADS``, else torch's default."""
    import torch

    return int(os.environ.get("BENCH_THREADS", torch.get_num_threads()))


def run_case(argv: list[str]) -> dict[str, Any] | None:
    """Run ``python <argv>`` from the repository root and return its ``RESULT`` (None, with its stderr printed,
    when it failed)."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def run_cases(script: str, prefix: str, models: Iterable[str], cases: Callable[[str], Iterable[tuple[str, ...]]],
              steps: int, line: Callable[[dict[str, Any]], str], *, builder: str | None = None,
              keep_going: bool = True) -> tuple[list[dict[str, Any]], int]:
    """In a temporary folder named ``prefix...``: for each model, ``<builder or script> --build MODEL WORKDIR``,
    then ``<script> --case MODEL *case WORKDIR`` for each ``case`` of ``cases(model)`` (its resolution last), each
    in its own process, printing ``line(result)``. A failed case prints ``<model> <case>px: FAILED (stderr
    above)`` and the next one runs; with ``keep_going=False`` the first failure ends the run instead. Returns
    the results and how many cases failed."""
    results: list[dict[str, Any]] = []
    failed = 0
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        for name in models:
            subprocess.run([sys.executable, builder or script, "--build", name, work], check=True, cwd=ROOT,
                           capture_output=True)
            for case in cases(name):
                result = run_case([script, "--steps", str(steps), "--case", name, *case, work])
                if result is None:
                    failed += 1
                    if not keep_going:
                        return results, failed
                    print(f"{name} {' '.join(case)}px: FAILED (stderr above)", flush=True)
                    continue
                results.append(result)
                print(line(result), flush=True)
    return results, failed


def bench_device() -> str:
    """``cuda`` when torch sees a GPU, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_variants(variants: Mapping[str, tuple[str, list[str], bool]], device: str) -> list[str]:
    """The names of a variant table (name -> (script, extra options, runs on the CPU)) that ``device`` runs."""
    return [name for name, (_, _, on_cpu) in variants.items() if device == "cuda" or on_cpu]


def write_results(path: str | Path | None, results: Any) -> None:
    """Write ``results`` as indented JSON to ``path`` (the bench's ``--json``), if given."""
    if path:
        Path(path).write_text(json.dumps(results, indent=2), encoding="utf-8")


def variant_line(result: dict[str, Any], device: str, kind: str, widths: tuple[int, int], denoiser: str) -> str:
    """The printed line of a transformer bench's case: model and variant (``result[kind]``) in columns of
    ``widths``, resolution, speed, peak memory, the denoiser's size (named ``denoiser``) and threads."""
    model_width, kind_width = widths
    return (f"{result['model']:{model_width}s} {result[kind]:{kind_width}s} {result['resolution']:4d}px {device}: "
            f"{result['seconds_per_step']:.3f} s/step, peak {result['peak_memory_mib']:.0f} MiB "
            f"({result['memory_kind']}), {denoiser} {result['transformer_parameters'] / 1e6:.1f} M params, "
            f"{result['threads']} thread(s)")


def memory_bench_main(doc: str, script: str, *, models: Mapping[str, dict[str, Any]],
                      resolutions: Mapping[str, Mapping[str, Sequence[int]]],
                      variants: Mapping[str, tuple[str, list[str], bool]], build: Callable[[str, Path], None],
                      one_case: Callable[..., dict[str, Any]], prefix: str, denoiser: str) -> int:
    """:func:`bench_main` of a bench over :func:`bench.timing.memory_variants` (FLUX.1, SD3): ``--models`` (tiny by
    default), ``--variants`` (every one the device runs), ``--resolutions`` (by device and model); every variant
    at each resolution of each model; ``denoiser`` names the denoiser in the printed lines."""
    parser = bench_parser(doc, models, ["tiny"], ("MODEL", "VARIANT", "RESOLUTION", "WORKDIR"),
                          variants=("variant", variants))

    def cases(args: argparse.Namespace, device: str, model: str) -> list[tuple[str, str]]:
        names = args.variants or device_variants(variants, device)
        return [(variant, str(resolution)) for resolution in args.resolutions or resolutions[device][model]
                for variant in names]

    return bench_main(parser, script, prefix, build=build, one_case=one_case, cases=cases,
                      line=lambda result, device: variant_line(result, device, "variant", (5, 14), denoiser))
