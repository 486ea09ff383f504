"""Training speed and peak memory of lumina_train_network.py (LoRA rank 16) and lumina_train.py (full
fine-tuning), with the memory options.

    python bench/bench_lumina_train.py [--steps 6] [--models tiny wide] [--modes ...] [--resolutions ...]
                                       [--json out.json]

Models (random weights, saved as the Next-DiT single file + gemma2/ae first):
  tiny   library.models.lumina.tiny defaults (width 48, 1 refiner layer of each kind) with 4 main layers
  wide   Lumina 2's width (2304, 24 heads / 8 key-value heads, feed-forward 9216, Gemma2 width 2304) with 3 main
         layers and 1 refiner layer of each kind
each at two resolutions (CPU: tiny 64/128 px, wide 128 px; CUDA: 512/1024 px), batch size 1, latents and text
outputs cached, ``--mixed_precision bf16`` on CUDA (full fine-tuning adds ``--full_bf16``). On CPU the wide
model runs the LoRA modes only (full fine-tuning it needs several GiB of optimizer state). Seconds per optimizer
step over ``--steps`` steps after 2 warm-up steps; peak memory is the process's peak RSS on CPU and
``torch.cuda.max_memory_allocated`` on CUDA. Each case runs in its own process (bench/timing.py).

Modes (``--modes``; default: every one the device runs):
  lora          LoRA rank 16 on the transformer (the reference)
  lora_ckpt     + --gradient_checkpointing
  lora_fp8      + --fp8_base (frozen Linear weights of the transformer and Gemma2 in float8)
  lora_swap     + --gradient_checkpointing --blocks_to_swap 1 (CUDA only: the last main layer streamed)
  lora_offload  + --gradient_checkpointing --cpu_offload_checkpointing (CUDA only)
  full          lumina_train.py, AdamW
  blockwise     lumina_train.py, AdamW, --blockwise_fused_optimizers
  full_swap     lumina_train.py, AdamW, --blockwise_fused_optimizers --gradient_checkpointing --blocks_to_swap 1
                (CUDA only)
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
    "tiny": dict(layers=4),
    "wide": dict(hidden=2304, heads=24, kv_heads=8, layers=3, refiner_layers=1, gemma_width=2304, gemma_layers=1),
}
RESOLUTIONS = {"cpu": {"tiny": (64, 128), "wide": (128,)}, "cuda": {"tiny": (512, 1024), "wide": (512, 1024)}}
CKPT = ["--gradient_checkpointing"]
BLOCKWISE = ["--blockwise_fused_optimizers"]
MODES = {  # name -> (script, extra options, runs on CPU)
    "lora": ("lumina_train_network.py", [], True),
    "lora_ckpt": ("lumina_train_network.py", CKPT, True),
    "lora_fp8": ("lumina_train_network.py", ["--fp8_base"], True),
    "lora_swap": ("lumina_train_network.py", CKPT + ["--blocks_to_swap", "1"], False),
    "lora_offload": ("lumina_train_network.py", CKPT + ["--cpu_offload_checkpointing"], False),
    "full": ("lumina_train.py", [], True),
    "blockwise": ("lumina_train.py", BLOCKWISE, True),
    "full_swap": ("lumina_train.py", BLOCKWISE + CKPT + ["--blocks_to_swap", "1"], False),
}


def _prepare(mode: str, argv: list[str]):
    from library.config.run_config import load_run_config
    from library.training.loop import prepare_training

    script, extra, _ = MODES[mode]
    if script == "lumina_train_network.py":
        import lumina_train_network
        from library.config.arguments import SUPPORT_TRAIN_NETWORK
        from library.models.lumina.recipe import LuminaLoRARecipe

        args = load_run_config(lumina_train_network.build_parser(), argv + extra + ["--network_dim", "16",
                                                                                     "--network_train_unet_only"])
        return prepare_training(args, LuminaLoRARecipe(args), SUPPORT_TRAIN_NETWORK, families=("lumina",))
    import lumina_train
    from library.config.arguments import SUPPORT_LUMINA_TRAIN
    from library.models.lumina.full import LuminaFullWeightRecipe
    from library.training.full_recipe import FINE_TUNING

    args = load_run_config(lumina_train.build_parser(), argv + extra)
    return prepare_training(args, LuminaFullWeightRecipe(args, FINE_TUNING), SUPPORT_LUMINA_TRAIN, families=("lumina",))


def one_case(name: str, mode: str, resolution: int, steps: int, work: Path) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    files = work / f"model_{name}"
    toml = write_dataset_toml(work, resolution)
    argv = ["--pretrained_model_name_or_path", str(files / "lumina.safetensors"), "--gemma2",
            str(files / "gemma2.safetensors"), "--ae", str(files / "ae.safetensors"), "--tokenizer_cache_dir",
            str(files / "tokenizers"), "--dataset_config", str(toml), "--output_dir",
            str(work / f"out_{name}_{mode}_{resolution}"), "--overwrite", "--cache_latents",
            "--cache_text_encoder_outputs", "--learning_rate", "1e-4", "--max_train_steps", "2", "--seed", "0",
            "--max_data_loader_n_workers", "0", "--mixed_precision", "bf16" if cuda else "no",
            "--gemma2_max_token_length", "64"]
    if cuda and MODES[mode][0] == "lumina_train.py":
        argv.append("--full_bf16")
    run = _prepare(mode, argv)
    params = sum(p.numel() for p in run.models.unet.parameters())
    return {"model": name, "mode": mode, "resolution": resolution, "transformer_parameters": params,
            **timed_training(run, steps)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per case (default 6)")
    parser.add_argument("--models", nargs="*", default=["tiny"], choices=list(CASES))
    parser.add_argument("--modes", nargs="*", default=None, choices=list(MODES),
                        help="default: every mode this device runs")
    parser.add_argument("--resolutions", nargs="*", type=int, default=None, help="default: by device and model")
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    parser.add_argument("--case", nargs=4, metavar=("MODEL", "MODE", "RESOLUTION", "WORKDIR"), help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs=2, metavar=("MODEL", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        from library.models.lumina.tiny import TinyLuminaConfig, save_tiny_lumina_files

        name, work = args.build
        save_tiny_lumina_files(Path(work) / f"model_{name}", TinyLuminaConfig(**CASES[name]))
        return 0
    if args.case:
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        name, mode, resolution, work = args.case
        print("RESULT " + json.dumps(one_case(name, mode, int(resolution), args.steps, Path(work))), flush=True)
        return 0

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    failed = 0
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_lumina_") as work:
        for name in args.models:
            subprocess.run([sys.executable, __file__, "--build", name, work], check=True, cwd=ROOT,
                           capture_output=True)
            modes = args.modes or [m for m, (_, _, on_cpu) in MODES.items() if device == "cuda" or on_cpu]
            if device == "cpu" and name == "wide":
                modes = [m for m in modes if MODES[m][0] == "lumina_train_network.py"]
            for mode in modes:
                for resolution in args.resolutions or RESOLUTIONS[device][name]:
                    result = run_case([__file__, "--steps", str(args.steps), "--case", name, mode, str(resolution),
                                       work])
                    if result is None:
                        print(f"{name} {mode} {resolution}px: FAILED (stderr above)", flush=True)
                        failed += 1
                        continue
                    results.append(result)
                    print(f"{name:4s} {mode:12s} {resolution:4d}px {device}: {result['seconds_per_step']:.3f} "
                          f"s/step, peak {result['peak_memory_mib']:.0f} MiB ({result['memory_kind']}), transformer "
                          f"{result['transformer_parameters'] / 1e6:.1f} M params, {result['threads']} thread(s)",
                          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
