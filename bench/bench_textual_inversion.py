"""Training speed and peak memory of textual inversion (train_textual_inversion.py) and XTI.

    python bench/bench_textual_inversion.py [--steps 6] [--models tiny sd15] [--json results.json]

The models and resolutions are those of bench/bench_train.py (random weights; CPU: tiny 64/128 px, sd15-width
128/256 px; CUDA: 256/512 and 512/768 px, ``--mixed_precision bf16``), batch size 1, latents cached, two
vectors per token. Seconds per optimizer step over ``--steps`` steps after 2 warm-up steps; peak memory is the
process's peak RSS on CPU and ``torch.cuda.max_memory_allocated`` on CUDA. Each case runs in its own process.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cases import bench_main, bench_parser, bench_threads  # noqa: E402
from bench.timing import timed_training, write_images  # noqa: E402

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
    threads = bench_threads()
    run = prepare_training(args, TextualInversionRecipe(args, xti=method == "xti"), SUPPORT_TEXTUAL_INVERSION)
    torch.set_num_threads(threads)
    return {"model": name, "method": method, "resolution": resolution, **timed_training(run, steps)}


def _line(result: dict, device: str) -> str:
    return (f"{result['model']:5s} {result['method']:3s} {result['resolution']:4d}px {device}: "
            f"{result['seconds_per_step']:.3f} s/step, peak {result['peak_memory_mib']:.0f} MiB "
            f"({result['memory_kind']}), {result['threads']} thread(s)")


def main() -> int:
    parser = bench_parser(__doc__, CASES, CASES, ("MODEL", "METHOD", "RESOLUTION", "WORKDIR"), build=False)
    return bench_main(parser, __file__, "bench_ti_", build=None, one_case=one_case, line=_line, keep_going=False,
                      cases=lambda args, device, name: [
                          (method, str(resolution)) for resolution in RESOLUTIONS[device][name] for method in METHODS],
                      builder=str(ROOT / "bench" / "bench_train.py"))


if __name__ == "__main__":
    sys.exit(main())
