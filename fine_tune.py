"""Fine-tuning: train the Stable Diffusion 1.x / 2.x model itself (the UNet; the text encoder too with
--train_text_encoder) on fine-tuning datasets (metadata files: --in_json, or metadata_file subsets).

    accelerate launch fine_tune.py --pretrained_model_name_or_path model.safetensors \
        --in_json meta_lat.json --train_data_dir train --resolution 512 --output_dir out --output_name my_ft \
        --learning_rate 5e-6 --max_train_steps 10000 --cache_latents_to_disk

See docs/train_db_and_fine_tune.md for every option.
"""

from __future__ import annotations

import os

# Reproducible CPU results (exact resume), as in train_network.py: set before torch loads.
os.environ.setdefault("MKL_CBWR", "AUTO")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from library.config.arguments import SUPPORT_FINE_TUNE  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.training.full_recipe import FINE_TUNING, build_full_parser, run_full_training  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return build_full_parser("fine_tune.py", "Fine-tuning of the whole model.", SUPPORT_FINE_TUNE, FINE_TUNING)


def main(argv: list[str] | None = None) -> Path | None:
    """Run a fine-tuning from command-line arguments; returns the final model (a file, or a folder for the
    diffusers formats); None with --debug_dataset or --output_config."""
    return run_full_training(build_parser(), argv, SUPPORT_FINE_TUNE, FINE_TUNING, tracker_name="finetuning")


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
