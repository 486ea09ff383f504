"""Training speed and peak memory of textual inversion (train_textual_inversion.py) and XTI.

    python bench/bench_textual_inversion.py [--steps 6] [--models tiny sd15] [--json results.json]

The models and resolutions are those of bench/bench_train.py (random weights; CPU: tiny 64/128 px, sd15-width
128/256 px; CUDA: 256/512 and 512/768 px, ``--mixed_precision bf16``), batch size 1, latents cached, two
vectors per token. Seconds per optimizer step over ``--steps`` steps after 2 warm-up steps; peak memory is the
process's peak RSS on CPU and ``torch.cuda.max_memory_allocated`` on CUDA. Each case runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_train import CASES, RESOLUTIONS  # noqa: E402

METHODS = ("ti", "xti")


def one_case(name: str, method: str, resolution: int, steps: int, work: Path) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from library.training.loop import prepare_training, train
    from library.training.textual_inversion import (SUPPORT_TEXTUAL_INVERSION, TextualInversionRecipe,
                                                    build_textual_inversion_parser, load_textual_inversion_args)

    cuda = torch.cuda.is_available()
    images = work / f"ti_images_{resolution}" / "1_bench"  # a DreamBooth folder (1 repeat) with captions
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.caption").write_text(f"a photo of benchtok {i}", encoding="utf-8")
    argv = ["--pretrained_model_name_or_path", str(work / f"model_{name}"), "--train_data_dir", str(images.parent),
            "--resolution", str(resolution), "--output_dir", str(work / f"out_{name}_{method}"),
            "--overwrite", "--token_string", "benchtok", "--init_word", "photo", "--num_vectors_per_token", "2",
            "--cache_latents", "--learning_rate", "1e-3", "--max_train_steps", "2", "--seed", "0",
            "--max_data_loader_n_workers", "0", "--mixed_precision", "bf16" if cuda else "no"]
    args = load_textual_inversion_args(build_textual_inversion_parser("bench", "bench", SUPPORT_TEXTUAL_INVERSION),
                                       argv)
    threads = int(os.environ.get("BENCH_THREADS", torch.get_num_threads()))
    run = prepare_training(args, TextualInversionRecipe(args, xti=method == "xti"), SUPPORT_TEXTUAL_INVERSION)
    torch.set_num_threads(threads)
    train(run)  # warm-up (2 steps)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    run.max_train_steps = steps
    start = time.perf_counter()
    train(run)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"model": name, "method": method, "resolution": resolution, "device": "cuda" if cuda else "cpu",
            "steps": steps, "seconds_per_step": elapsed / steps, "peak_memory_mib": peak / 2**20,
            "memory_kind": "cuda allocated" if cuda else "process RSS", "threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per case (default 6)")
    parser.add_argument("--models", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    parser.add_argument("--case", nargs=4, metavar=("MODEL", "METHOD", "RESOLUTION", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        name, method, resolution, work = args.case
        print("RESULT " + json.dumps(one_case(name, method, int(resolution), args.steps, Path(work))), flush=True)
        return 0

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_ti_") as work:
        for name in args.models:
            subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--build", name, work],
                           check=True, cwd=ROOT, capture_output=True)
            for resolution in RESOLUTIONS[device][name]:
                for method in METHODS:
                    proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--case", name,
                                           method, str(resolution), work], capture_output=True, text=True, cwd=ROOT)
                    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                    if proc.returncode != 0 or not lines:
                        print(proc.stderr[-3000:], file=sys.stderr)
                        return 1
                    result = json.loads(lines[-1][len("RESULT "):])
                    results.append(result)
                    print(f"{name:5s} {method:3s} {resolution:4d}px {device}: {result['seconds_per_step']:.3f} s/step, "
                          f"peak {result['peak_memory_mib']:.0f} MiB ({result['memory_kind']}), "
                          f"{result['threads']} thread(s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
