"""Training speed and peak memory of flux_train_network.py's and flux_train.py's loop (FLUX.1), with the memory
options.

    python bench/bench_flux_train.py [--steps 6] [--models tiny wide] [--variants ...] [--json results.json]

Models (random weights, saved as BFL single files + clip_l/t5xxl/ae first):
  tiny   library.models.flux.tiny defaults (2 double + 2 single blocks, width 64)
  wide   FLUX.1's width (24 heads x 128 = 3072, MLP 12288) with 1 double + 2 single blocks, T5 width 4096
each at two resolutions (CPU: tiny 64/128 px; CUDA: 512/1024 px), batch size 1, LoRA rank 16 on the
transformer (text encoders frozen, outputs and latents cached), ``--mixed_precision bf16`` on CUDA. Seconds
per optimizer step over ``--steps`` steps after 2 warm-up steps; peak memory is the process's peak RSS on
CPU and ``torch.cuda.max_memory_allocated`` on CUDA (measured after the warm-up). Each case runs in its own
process.

Variants (``--variants``; default: every one the device runs): bench/timing.py's memory_variants() of
flux_train_network.py (``lora``, LoRA rank 16, is the reference) and flux_train.py (bf16 weights on CUDA:
--full_bf16), where ``--blocks_to_swap 2`` streams 1 double + 2 single blocks.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cases import memory_bench_main  # noqa: E402
from bench.timing import memory_variants, prepare_run, transformer_case  # noqa: E402

CASES = {
    "tiny": {},
    "wide": dict(depth=1, depth_single=2, heads=24, head_dim=128, clip_width=768, t5_width=4096),
}
RESOLUTIONS = {"cpu": {"tiny": (64, 128), "wide": (128,)}, "cuda": {"tiny": (512, 1024), "wide": (512, 1024)}}
VARIANTS = memory_variants("flux_train_network.py", "flux_train.py", swap_blocks=2)


def build_model(name: str, work: Path) -> None:
    """Write the case's model files (BFL single files) to ``work/model_<name>``."""
    from library.models.flux.tiny import TinyFluxConfig, save_tiny_flux_files

    save_tiny_flux_files(work / f"model_{name}", TinyFluxConfig(**CASES[name]))


def _prepare(script: str, argv: list[str]):
    if script == "flux_train.py":
        import flux_train
        from library.config.arguments import SUPPORT_FLUX_TRAIN
        from library.models.flux.recipe import FluxFullWeightRecipe

        return prepare_run(flux_train, FluxFullWeightRecipe, SUPPORT_FLUX_TRAIN, ("flux",), argv)
    import flux_train_network
    from library.config.arguments import SUPPORT_TRAIN_NETWORK
    from library.models.flux.recipe import FluxLoRARecipe

    return prepare_run(flux_train_network, FluxLoRARecipe, SUPPORT_TRAIN_NETWORK, ("flux",), argv)


def one_case(name: str, variant: str, resolution: int, steps: int, work: Path) -> dict:
    files = work / f"model_{name}"
    model_argv = ["--pretrained_model_name_or_path", str(files / "flux.safetensors"), "--clip_l",
                  str(files / "clip_l.safetensors"), "--t5xxl", str(files / "t5xxl.safetensors"), "--ae",
                  str(files / "ae.safetensors"), "--tokenizer_cache_dir", str(files / "tokenizers"),
                  "--t5xxl_max_token_length", "64"]
    return transformer_case(name, variant, resolution, steps, work, variants=VARIANTS, full_script="flux_train.py",
                            model_argv=model_argv, prepare=_prepare)


def main() -> int:
    return memory_bench_main(__doc__, __file__, models=CASES, resolutions=RESOLUTIONS, variants=VARIANTS,
                             build=build_model, one_case=one_case, prefix="bench_flux_", denoiser="transformer")


if __name__ == "__main__":
    sys.exit(main())
