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

Variants (``--variants``; default: every one the device runs): bench/timing.py's memory_variants() of
sd3_train_network.py (``lora``, LoRA rank 16 on the MMDiT, is the reference) and sd3_train.py (bf16 weights on
CUDA: --full_bf16), where ``--blocks_to_swap 1`` streams the last joint block.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cases import memory_bench_main  # noqa: E402
from bench.timing import memory_variants, prepare_run, transformer_case  # noqa: E402

CASES = {
    "tiny": dict(depth=4),
    "wide": dict(depth=3, heads=24, head_dim=64, clip_l_width=768, clip_g_width=1280, t5_width=4096,
                 vae_channels=64),
}
RESOLUTIONS = {"cpu": {"tiny": (64, 128), "wide": (128,)}, "cuda": {"tiny": (512, 1024), "wide": (512, 1024)}}
VARIANTS = memory_variants("sd3_train_network.py", "sd3_train.py", swap_blocks=1)


def build_model(name: str, work: Path) -> None:
    """Write the case's model (the SAI single file, text encoders and VAE inside) to ``work/model_<name>``."""
    from library.models.sd3.tiny import TinySD3Config, save_tiny_sd3_files

    save_tiny_sd3_files(work / f"model_{name}", TinySD3Config(**CASES[name]))


def _prepare(script: str, argv: list[str]):
    if script == "sd3_train.py":
        import sd3_train
        from library.config.arguments import SUPPORT_SDXL_TRAIN
        from library.models.sd3.full import SD3FullWeightRecipe
        from library.training.full_recipe import FINE_TUNING

        return prepare_run(sd3_train, lambda args: SD3FullWeightRecipe(args, FINE_TUNING), SUPPORT_SDXL_TRAIN,
                           ("sd3",), argv)
    import sd3_train_network
    from library.config.arguments import SUPPORT_TRAIN_NETWORK
    from library.models.sd3.recipe import SD3LoRARecipe

    return prepare_run(sd3_train_network, SD3LoRARecipe, SUPPORT_TRAIN_NETWORK, ("sd3",), argv)


def one_case(name: str, variant: str, resolution: int, steps: int, work: Path) -> dict:
    files = work / f"model_{name}"
    model_argv = ["--pretrained_model_name_or_path", str(files / "sd3.safetensors"), "--tokenizer_cache_dir",
                  str(files / "tokenizers"), "--t5xxl_max_token_length", "64", "--weighting_scheme", "logit_normal"]
    return transformer_case(name, variant, resolution, steps, work, variants=VARIANTS, full_script="sd3_train.py",
                            model_argv=model_argv, prepare=_prepare)


def main() -> int:
    return memory_bench_main(__doc__, __file__, models=CASES, resolutions=RESOLUTIONS, variants=VARIANTS,
                             build=build_model, one_case=one_case, prefix="bench_sd3_", denoiser="MMDiT")


if __name__ == "__main__":
    sys.exit(main())
