"""Fine-tune a whole FLUX.1 transformer (dev or schnell) with sd-scripts' options; saves the BFL single file.

    accelerate launch flux_train.py --pretrained_model_name_or_path flux1-dev.safetensors \
        --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors \
        --dataset_config data.toml --output_dir out --output_name my_flux --learning_rate 5e-6 \
        --mixed_precision bf16 --full_bf16 --optimizer_type adafactor --fused_backward_pass \
        --optimizer_args "relative_step=False" "scale_parameter=False" "warmup_init=False" \
        --cache_latents_to_disk --cache_text_encoder_outputs --gradient_checkpointing

See docs/flux.md for the FLUX options; the others are those of fine_tune.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from library.config.arguments import SUPPORT_FLUX_TRAIN  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.models.flux.recipe import FluxFullWeightRecipe, add_flux_full_arguments  # noqa: E402
from library.training.full_recipe import FINE_TUNING, build_full_parser, run_full_training  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return build_full_parser("flux_train.py", "Fine-tuning of a whole FLUX.1 transformer.", SUPPORT_FLUX_TRAIN,
                             FINE_TUNING, extra=add_flux_full_arguments)


def _metadata(run) -> dict[str, str]:
    from library.models.flux.arguments import flux_ss_metadata
    from library.training.full_recipe import full_model_metadata

    return {**full_model_metadata(run), **flux_ss_metadata(run.args, run.models.family)}


def main(argv: list[str] | None = None) -> Path | None:
    """Run a fine-tuning from command-line arguments; returns the saved model file (None with --debug_dataset
    or --output_config)."""
    return run_full_training(build_parser(), argv, SUPPORT_FLUX_TRAIN, FINE_TUNING, tracker_name="flux_finetuning",
                             recipe_class=lambda args, style: FluxFullWeightRecipe(args), families=("flux",),
                             metadata=_metadata)


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
