"""Training speed and peak memory of train_network.py's loop.

    python bench/bench_train.py [--steps 6] [--json results.json]

Models (random weights, saved as diffusers folders first):
  tiny   library.models.tiny defaults (UNet 32/32/64/64 channels, 1.6 M parameters)
  sd15   SD1.5's UNet widths (320/640/1280/1280), 8 heads, cross-attention dim 768, SD1.5 block types, but one
         layer per block instead of two; a 2-layer CLIP-L-width text encoder; the tiny VAE (latents are cached)
each at two resolutions (CPU: 64/128 and 128/256 px; CUDA: 256/512 and 512/768 px), batch size 1, LoRA rank 16
on the UNet (text encoder frozen, its outputs cached). Seconds per optimizer step are measured over
``--steps`` steps after 2 warm-up steps; peak memory is the process's peak RSS on CPU, and
``torch.cuda.max_memory_allocated`` on CUDA (with ``--mixed_precision bf16`` there). Each case runs in its
own process so peaks do not mix.
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

CASES = {
    "tiny": dict(block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, text_layers=2, text_heads=4,
                 text_intermediate=64),
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, text_layers=2, text_heads=12,
                 text_intermediate=3072),
}
RESOLUTIONS = {"cpu": {"tiny": (64, 128), "sd15": (128, 256)}, "cuda": {"tiny": (256, 512), "sd15": (512, 768)}}


def one_case(name: str, resolution: int, steps: int, work: Path) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from library.models.tiny import TinyConfig, save_tiny_diffusers_model
    from tests.train_helpers import prepare_run

    cuda = torch.cuda.is_available()
    model = work / f"model_{name}"
    if not (model / "model_index.json").is_file():
        save_tiny_diffusers_model(model, TinyConfig(**CASES[name]))
    images = work / f"images_{resolution}"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.caption").write_text(f"a photo {i}", encoding="utf-8")
    toml = work / f"data_{resolution}.toml"
    toml.write_text(f"[general]\nresolution = {resolution}\nbatch_size = 1\n[[datasets]]\n[[datasets.subsets]]\n"
                    f"image_dir = '{images.as_posix()}'\n", encoding="utf-8")
    out = work / f"out_{name}_{resolution}"
    argv = ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(toml), "--output_dir", str(out),
            "--overwrite", "--network_dim", "16", "--network_train_unet_only", "--cache_latents",
            "--learning_rate", "1e-4", "--max_train_steps", "2", "--seed", "0", "--max_data_loader_n_workers", "0",
            "--mixed_precision", "bf16" if cuda else "no"]
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    from library.training.loop import train

    run = prepare_run(argv)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    unet_params = sum(p.numel() for p in run.models.unet.parameters())
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
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"model": name, "resolution": resolution, "device": "cuda" if cuda else "cpu",
            "unet_parameters": unet_params, "steps": steps, "seconds_per_step": elapsed / steps,
            "peak_memory_mib": peak / 2**20, "memory_kind": "cuda allocated" if cuda else "process RSS",
            "threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per case (default 6)")
    parser.add_argument("--models", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    parser.add_argument("--case", nargs=3, metavar=("MODEL", "RESOLUTION", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        name, resolution, work = args.case
        print("RESULT " + json.dumps(one_case(name, int(resolution), args.steps, Path(work))), flush=True)
        return 0

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as work:
        for name in args.models:
            for resolution in RESOLUTIONS[device][name]:
                proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--case", name,
                                       str(resolution), work], capture_output=True, text=True, cwd=ROOT)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                result = json.loads(lines[-1][len("RESULT "):])
                results.append(result)
                print(f"{name:5s} {resolution:4d}px {device}: {result['seconds_per_step']:.3f} s/step, peak "
                      f"{result['peak_memory_mib']:.0f} MiB ({result['memory_kind']}), UNet "
                      f"{result['unet_parameters'] / 1e6:.1f} M params, {result['threads']} thread(s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
