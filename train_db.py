"""DreamBooth: train the Stable Diffusion 1.x / 2.x model itself (UNet, and the text encoder unless stopped)
on DreamBooth-style datasets (class+identifier folders or captions, with regularization images).

    accelerate launch train_db.py --pretrained_model_name_or_path model.safetensors \
        --train_data_dir train --reg_data_dir reg --resolution 512 --output_dir out --output_name my_db \
        --learning_rate 1e-6 --max_train_steps 1600 --stop_text_encoder_training 800

See docs/train_db_and_fine_tune.md for every option.
"""

from __future__ import annotations

import os

# Reproducible CPU results (exact resume), as in train_network.py: set before torch loads.
os.environ.setdefault("MKL_CBWR", "AUTO")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from library.config.arguments import SUPPORT_TRAIN_DB  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.training.full_recipe import DREAMBOOTH, build_full_parser, run_full_training  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return build_full_parser("train_db.py", "DreamBooth training of the whole model.", SUPPORT_TRAIN_DB, DREAMBOOTH)


def main(argv: list[str] | None = None) -> Path | None:
    """Run a DreamBooth training from command-line arguments; returns the final model (a file, or a folder for
    the diffusers formats); None with --debug_dataset or --output_config."""
    return run_full_training(build_parser(), argv, SUPPORT_TRAIN_DB, DREAMBOOTH, tracker_name="dreambooth")


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
