"""Fine-tune a whole Lumina Image 2.0 transformer (Gemma2 and the AE stay frozen), as sd-scripts' lumina_train.py.

    accelerate launch lumina_train.py --pretrained_model_name_or_path lumina_2_model_bf16.safetensors \
        --gemma2 gemma_2_2b_fp16.safetensors --ae ae.safetensors --dataset_config data.toml \
        --output_dir out --output_name my_lumina --learning_rate 1e-5 --mixed_precision bf16 --full_bf16 \
        --gradient_checkpointing --blockwise_fused_optimizers --mem_eff_save

The model is saved in the Next-DiT single-file layout. See docs/lumina.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from library.config.arguments import SUPPORT_LUMINA_TRAIN  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.models.lumina.full import LuminaFullWeightRecipe, add_lumina_full_arguments  # noqa: E402
from library.training.full_recipe import FINE_TUNING, build_full_parser, run_full_training  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return build_full_parser("lumina_train.py", "Fine-tuning of a whole Lumina Image 2.0 transformer.",
                             SUPPORT_LUMINA_TRAIN, FINE_TUNING, extra=add_lumina_full_arguments)


def main(argv: list[str] | None = None) -> Path | None:
    """Run a fine-tuning from command-line arguments; returns the saved model file (None with --debug_dataset or
    --output_config)."""
    return run_full_training(build_parser(), argv, SUPPORT_LUMINA_TRAIN, FINE_TUNING, tracker_name="lumina_finetuning",
                             recipe_class=LuminaFullWeightRecipe, families=("lumina",))


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
