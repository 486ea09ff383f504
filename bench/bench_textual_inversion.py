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
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.timing import run_case, timed_training, write_dataset_toml, write_images  # noqa: E402

from bench.bench_train import CASES, RESOLUTIONS  # noqa: E402

METHODS = ("ti", "xti")


def one_case(name: str, method: str, resolution: int, steps: int, work: Path) -> dict:
    import torch

    from library.training.loop import prepare_training
    from library.training.textual_inversion import (SUPPORT_TEXTUAL_INVERSION, TextualInversionRecipe,
                                                    build_textual_inversion_parser, load_textual_inversion_args)

    cuda = torch.cuda.is_available()
    # a DreamBooth folder (1 repeat) with captions
    images = write_images(work / f"ti_images_{resolution}" / "1_bench", resolution, "a photo of benchtok {i}")
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
    return {"model": name, "method": method, "resolution": resolution, **timed_training(run, steps)}


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
                    result = run_case([__file__, "--steps", str(args.steps), "--case", name, method,
                                       str(resolution), work])
                    if result is None:
                        return 1
                    results.append(result)
                    print(f"{name:5s} {method:3s} {resolution:4d}px {device}: {result['seconds_per_step']:.3f} s/step, "
                          f"peak {result['peak_memory_mib']:.0f} MiB ({result['memory_kind']}), "
                          f"{result['threads']} thread(s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
