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
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cases import bench_main, bench_parser, device_variants, variant_line  # noqa: E402
from bench.timing import prepare_run, transformer_case  # noqa: E402

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


def build_model(name: str, work: Path) -> None:
    """Write the case's model files (the Next-DiT single file, gemma2, ae) to ``work/model_<name>``."""
    from library.models.lumina.tiny import TinyLuminaConfig, save_tiny_lumina_files

    save_tiny_lumina_files(work / f"model_{name}", TinyLuminaConfig(**CASES[name]))


def _prepare(script: str, argv: list[str]):
    if script == "lumina_train_network.py":
        import lumina_train_network
        from library.config.arguments import SUPPORT_TRAIN_NETWORK
        from library.models.lumina.recipe import LuminaLoRARecipe

        return prepare_run(lumina_train_network, LuminaLoRARecipe, SUPPORT_TRAIN_NETWORK, ("lumina",),
                           argv + ["--network_dim", "16", "--network_train_unet_only"])
    import lumina_train
    from library.config.arguments import SUPPORT_LUMINA_TRAIN
    from library.models.lumina.full import LuminaFullWeightRecipe
    from library.training.full_recipe import FINE_TUNING

    return prepare_run(lumina_train, lambda args: LuminaFullWeightRecipe(args, FINE_TUNING), SUPPORT_LUMINA_TRAIN,
                       ("lumina",), argv)


def one_case(name: str, mode: str, resolution: int, steps: int, work: Path) -> dict:
    files = work / f"model_{name}"
    model_argv = ["--pretrained_model_name_or_path", str(files / "lumina.safetensors"), "--gemma2",
                  str(files / "gemma2.safetensors"), "--ae", str(files / "ae.safetensors"), "--tokenizer_cache_dir",
                  str(files / "tokenizers"), "--gemma2_max_token_length", "64"]
    return transformer_case(name, mode, resolution, steps, work, variants=MODES, full_script="lumina_train.py",
                            model_argv=model_argv, prepare=_prepare, kind="mode")


def _cases(args: argparse.Namespace, device: str, name: str) -> list[tuple[str, str]]:
    modes = args.modes or device_variants(MODES, device)
    if device == "cpu" and name == "wide":
        modes = [m for m in modes if MODES[m][0] == "lumina_train_network.py"]
    resolutions = args.resolutions or RESOLUTIONS[device][name]
    return [(mode, str(resolution)) for mode in modes for resolution in resolutions]


def main() -> int:
    parser = bench_parser(__doc__, CASES, ["tiny"], ("MODEL", "MODE", "RESOLUTION", "WORKDIR"),
                          variants=("mode", MODES))
    return bench_main(parser, __file__, "bench_lumina_", build=build_model, one_case=one_case, cases=_cases,
                      line=lambda result, device: variant_line(result, device, "mode", (4, 12), "transformer"))


if __name__ == "__main__":
    sys.exit(main())
