"""Training speed and peak memory of sd3_train_network.py's and sd3_train.py's loop (SD3.5 Medium style), with the
memory options.

    python bench/bench_sd3_train.py [--steps 6] [--models tiny wide] [--variants ...] [--resolutions ...]
                                    [--json results.json]

Models (random weights, saved as the SAI single file with the text encoders and VAE inside):
  tiny   library.models.sd3.tiny defaults (SD3.5 Medium style: width 32, one dual-attention layer) with 4 joint blocks
  wide   SD3.5 Medium's width (24 heads x 64 = 1536, qk-norm, dual attention in block 0) with 3 joint blocks, CLIP-L
         768 + CLIP-G 1280 (2 layers each), T5 width 4096 (2 layers)
each at two resolutions (CPU: tiny 64/128 px, wide 128 px; CUDA: 512/1024 px), batch size 1, text outputs and
latents cached, ``--mixed_precision bf16`` on CUDA. Seconds per optimizer step over ``--steps`` steps after 2
warm-up steps; peak memory is the process's peak RSS on CPU and ``torch.cuda.max_memory_allocated`` on CUDA. Each
case runs in its own process.

Variants (``--variants``; default: every one the device runs):
  lora           LoRA rank 16 on the MMDiT (the reference)
  lora_ckpt      + --gradient_checkpointing
  lora_fp8       + --fp8_base (frozen Linear weights in float8)
  lora_swap      + --gradient_checkpointing --blocks_to_swap 1 (CUDA only: the last joint block streamed)
  lora_offload   + --gradient_checkpointing --cpu_offload_checkpointing (CUDA only)
  full_blockwise sd3_train.py, AdamW, --blockwise_fused_optimizers (bf16 weights on CUDA: --full_bf16)
  full_swap      sd3_train.py, AdaFactor --fused_backward_pass --gradient_checkpointing --blocks_to_swap 1 (CUDA)
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

from bench.timing import memory_variants, run_case, timed_training, write_dataset_toml  # noqa: E402

CASES = {
    "tiny": dict(depth=4),
    "wide": dict(depth=3, heads=24, head_dim=64, clip_l_width=768, clip_g_width=1280, t5_width=4096,
                 vae_channels=64),
}
RESOLUTIONS = {"cpu": {"tiny": (64, 128), "wide": (128,)}, "cuda": {"tiny": (512, 1024), "wide": (512, 1024)}}
VARIANTS = memory_variants("sd3_train_network.py", "sd3_train.py", swap_blocks=1)


def one_case(name: str, variant: str, resolution: int, steps: int, work: Path) -> dict:
    import torch

    from library.config.run_config import load_run_config
    from library.training.loop import prepare_training

    cuda = torch.cuda.is_available()
    script, extra, _ = VARIANTS[variant]
    files = work / f"model_{name}"
    toml = write_dataset_toml(work, resolution)
    argv = ["--pretrained_model_name_or_path", str(files / "sd3.safetensors"), "--tokenizer_cache_dir",
            str(files / "tokenizers"), "--dataset_config", str(toml), "--output_dir",
            str(work / f"out_{name}_{variant}_{resolution}"), "--overwrite", "--cache_latents",
            "--cache_text_encoder_outputs", "--learning_rate", "1e-4", "--max_train_steps", "2", "--seed", "0",
            "--max_data_loader_n_workers", "0", "--mixed_precision", "bf16" if cuda else "no",
            "--t5xxl_max_token_length", "64", "--weighting_scheme", "logit_normal", *extra]
    if script == "sd3_train.py":
        import sd3_train
        from library.config.arguments import SUPPORT_SDXL_TRAIN
        from library.models.sd3.full import SD3FullWeightRecipe
        from library.training.full_recipe import FINE_TUNING

        args = load_run_config(sd3_train.build_parser(), argv + (["--full_bf16"] if cuda else []))
        run = prepare_training(args, SD3FullWeightRecipe(args, FINE_TUNING), SUPPORT_SDXL_TRAIN, families=("sd3",))
    else:
        import sd3_train_network
        from library.config.arguments import SUPPORT_TRAIN_NETWORK
        from library.models.sd3.recipe import SD3LoRARecipe

        args = load_run_config(sd3_train_network.build_parser(), argv)
        run = prepare_training(args, SD3LoRARecipe(args), SUPPORT_TRAIN_NETWORK, families=("sd3",))
    params = sum(p.numel() for p in run.models.unet.parameters())
    return {"model": name, "variant": variant, "resolution": resolution, "transformer_parameters": params,
            **timed_training(run, steps)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per case (default 6)")
    parser.add_argument("--models", nargs="*", default=["tiny"], choices=list(CASES))
    parser.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS),
                        help="default: every variant this device runs")
    parser.add_argument("--resolutions", nargs="*", type=int, default=None, help="default: by device and model")
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    parser.add_argument("--case", nargs=4, metavar=("MODEL", "VARIANT", "RESOLUTION", "WORKDIR"),
                        help=argparse.SUPPRESS)
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
        name, variant, resolution, work = args.case
        print("RESULT " + json.dumps(one_case(name, variant, int(resolution), args.steps, Path(work))), flush=True)
        return 0

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = args.variants or [v for v, (_, _, on_cpu) in VARIANTS.items() if device == "cuda" or on_cpu]
    failed = 0
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_sd3_") as work:
        for name in args.models:
            subprocess.run([sys.executable, __file__, "--build", name, work], check=True, cwd=ROOT,
                           capture_output=True)
            for resolution in args.resolutions or RESOLUTIONS[device][name]:
                for variant in variants:
                    result = run_case([__file__, "--steps", str(args.steps), "--case", name, variant,
                                       str(resolution), work])
                    if result is None:
                        print(f"{name} {variant} {resolution}px: FAILED (stderr above)", flush=True)
                        failed += 1
                        continue
                    results.append(result)
                    print(f"{name:5s} {variant:14s} {resolution:4d}px {device}: {result['seconds_per_step']:.3f} "
                          f"s/step, peak {result['peak_memory_mib']:.0f} MiB ({result['memory_kind']}), MMDiT "
                          f"{result['transformer_parameters'] / 1e6:.1f} M params, {result['threads']} thread(s)",
                          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
