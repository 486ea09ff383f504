"""Train a LoRA (or another kohya-style network module) on Stable Diffusion 1.x / 2.x.

    accelerate launch train_network.py --pretrained_model_name_or_path model --dataset_config data.toml \
        --output_dir out --output_name my_lora --network_dim 8 --max_train_epochs 10

See docs/train_network.md for every option.
"""

from __future__ import annotations

import os

# Intel MKL picks kernels by memory alignment unless told otherwise, so the same run could give different
# weights; AUTO keeps the fast kernels and makes results reproducible (needed for bit-exact resume on CPU).
os.environ.setdefault("MKL_CBWR", "AUTO")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from library.config.arguments import SUPPORT_TRAIN_NETWORK, add_config_file_arguments, add_dataset_arguments  # noqa: E402
from library.errors import run_cli
from library.models.arguments import add_model_arguments
from library.training.arguments import add_training_arguments
from library.training.losses import add_loss_arguments
from library.training.network_args import add_network_arguments
from library.training.noise import add_noise_arguments
from library.training.optimizers import add_optimizer_arguments
from library.training.sampling import add_sampling_arguments
from library.training.schedulers import add_scheduler_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train_network.py", description="Train a LoRA network.")
    add_config_file_arguments(parser)
    add_model_arguments(parser)
    add_dataset_arguments(parser, SUPPORT_TRAIN_NETWORK)
    add_network_arguments(parser)
    add_noise_arguments(parser)
    add_loss_arguments(parser)
    add_optimizer_arguments(parser)
    add_scheduler_arguments(parser)
    add_sampling_arguments(parser)
    add_training_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> Path | None:
    """Run a training from command-line arguments; returns the final LoRA file (None with --debug_dataset or
    --output_config)."""
    from library.config.run_config import load_run_config
    from library.training.loop import run_training
    from library.training.lora_metadata import lora_metadata_for_run
    from library.training.recipes import LoRARecipe

    args = load_run_config(build_parser(), argv)
    if args is None:
        return None
    return run_training(args, LoRARecipe(args), SUPPORT_TRAIN_NETWORK, tracker_name="network_train",
                        metadata=lora_metadata_for_run)


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
