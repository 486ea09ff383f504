"""Fine-tune a whole SDXL model (UNet; both text encoders with --train_text_encoder) on fine-tuning
(metadata) or DreamBooth-style datasets, as sd-scripts' sdxl_train.py.

    accelerate launch sdxl_train.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \
        --dataset_config data.toml --output_dir out --output_name my_sdxl --learning_rate 4e-6 \
        --max_train_steps 10000 --mixed_precision bf16 --full_bf16 --gradient_checkpointing

See docs/sdxl.md for the SDXL options; the others are those of fine_tune.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from library.config.arguments import SUPPORT_SDXL_TRAIN  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.training.full_recipe import FINE_TUNING, build_full_parser, run_full_training  # noqa: E402
from library.training.sdxl_full import SDXLFullWeightRecipe, add_sdxl_full_arguments  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return build_full_parser("sdxl_train.py", "Fine-tuning of a whole SDXL model.", SUPPORT_SDXL_TRAIN, FINE_TUNING,
                             extra=add_sdxl_full_arguments)


def main(argv: list[str] | None = None) -> Path | None:
    """Run a fine-tuning from command-line arguments; returns the final model (a file, or a folder for the
    diffusers formats); None with --debug_dataset or --output_config."""
    return run_full_training(build_parser(), argv, SUPPORT_SDXL_TRAIN, FINE_TUNING, tracker_name="sdxl_finetuning",
                             recipe_class=SDXLFullWeightRecipe, families=("sdxl",))


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
