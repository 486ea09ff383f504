"""Training speed and peak memory of sd3_train_network.py's loop (SD3.5 Medium style LoRA, rank 16).

    python bench/bench_sd3_train.py [--steps 6] [--models tiny wide] [--json results.json]

Models (random weights, saved as the SAI single file with the text encoders and VAE inside):
  tiny   library.models.sd3.tiny defaults (SD3.5 Medium style: 2 blocks, width 32, one dual-attention layer)
  wide   SD3.5 Medium's width (24 heads x 64 = 1536, qk-norm, dual attention in block 0) with 2 blocks, CLIP-L 768 +
         CLIP-G 1280 (2 layers each), T5 width 4096 (2 layers)
each at two resolutions (CPU: tiny 64/128 px, wide 128 px; CUDA: 512/1024 px), batch size 1, LoRA rank 16 on the
MMDiT (text encoders frozen, outputs and latents cached), ``--mixed_precision bf16`` on CUDA. Seconds per
optimizer step over ``--steps`` steps after 2 warm-up steps; peak memory is the process's peak RSS on CPU and
``torch.cuda.max_memory_allocated`` on CUDA. Each case runs in its own process.
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

from bench.timing import run_case, timed_training, write_dataset_toml  # noqa: E402

CASES = {
    "tiny": {},
    "wide": dict(heads=24, head_dim=64, clip_l_width=768, clip_g_width=1280, t5_width=4096, vae_channels=64),
}
RESOLUTIONS = {"cpu": {"tiny": (64, 128), "wide": (128,)}, "cuda": {"tiny": (512, 1024), "wide": (512, 1024)}}


def one_case(name: str, resolution: int, steps: int, work: Path) -> dict:
    import torch

    import sd3_train_network
    from library.config.arguments import SUPPORT_TRAIN_NETWORK
    from library.config.run_config import load_run_config
    from library.models.sd3.recipe import SD3LoRARecipe
    from library.training.loop import prepare_training

    cuda = torch.cuda.is_available()
    files = work / f"model_{name}"
    toml = write_dataset_toml(work, resolution)
    argv = ["--pretrained_model_name_or_path", str(files / "sd3.safetensors"), "--tokenizer_cache_dir",
            str(files / "tokenizers"), "--dataset_config", str(toml), "--output_dir",
            str(work / f"out_{name}_{resolution}"), "--overwrite", "--network_dim", "16", "--network_train_unet_only",
            "--cache_latents", "--cache_text_encoder_outputs", "--learning_rate", "1e-4", "--max_train_steps", "2",
            "--seed", "0", "--max_data_loader_n_workers", "0", "--mixed_precision", "bf16" if cuda else "no",
            "--t5xxl_max_token_length", "64", "--weighting_scheme", "logit_normal"]
    args = load_run_config(sd3_train_network.build_parser(), argv)
    run = prepare_training(args, SD3LoRARecipe(args), SUPPORT_TRAIN_NETWORK, families=("sd3",))
    params = sum(p.numel() for p in run.models.unet.parameters())
    return {"model": name, "resolution": resolution, "transformer_parameters": params,
            **timed_training(run, steps)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per case (default 6)")
    parser.add_argument("--models", nargs="*", default=["tiny"], choices=list(CASES))
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    parser.add_argument("--case", nargs=3, metavar=("MODEL", "RESOLUTION", "WORKDIR"), help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs=2, metavar=("MODEL", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        from library.models.sd3.tiny import TinySD3Config, save_tiny_sd3_files

        name, work = args.build
        save_tiny_sd3_files(Path(work) / f"model_{name}", TinySD3Config(**CASES[name]))
        return 0
    if args.case:
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        name, resolution, work = args.case
        print("RESULT " + json.dumps(one_case(name, int(resolution), args.steps, Path(work))), flush=True)
        return 0

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_sd3_") as work:
        for name in args.models:
            subprocess.run([sys.executable, __file__, "--build", name, work], check=True, cwd=ROOT,
                           capture_output=True)
            for resolution in RESOLUTIONS[device][name]:
                result = run_case([__file__, "--steps", str(args.steps), "--case", name, str(resolution), work])
                if result is None:
                    return 1
                results.append(result)
                print(f"{name:5s} {resolution:4d}px {device}: {result['seconds_per_step']:.3f} s/step, peak "
                      f"{result['peak_memory_mib']:.0f} MiB ({result['memory_kind']}), MMDiT "
                      f"{result['transformer_parameters'] / 1e6:.1f} M params, {result['threads']} thread(s)",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
