"""Train a LoRA / LoCon (or another kohya-style network module) on SDXL.

    accelerate launch sdxl_train_network.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \
        --dataset_config data.toml --output_dir out --output_name my_lora --network_dim 8 --max_train_epochs 10

The options are those of train_network.py; SDXL is recognised from the checkpoint. See docs/sdxl.md.
"""

from __future__ import annotations

import os

# Intel MKL picks kernels by memory alignment unless told otherwise, so the same run could give different
# weights; AUTO keeps the fast kernels and makes results reproducible (needed for bit-exact resume on CPU).
os.environ.setdefault("MKL_CBWR", "AUTO")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from library.config.arguments import SUPPORT_TRAIN_NETWORK  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.training.network_args import add_network_arguments  # noqa: E402
from library.training.parser import build_training_parser  # noqa: E402


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    from library.training.sdxl_full import add_sdxl_model_arguments

    add_network_arguments(parser)
    add_sdxl_model_arguments(parser.add_argument_group("SDXL"))


def build_parser() -> argparse.ArgumentParser:
    return build_training_parser(prog="sdxl_train_network.py", description="Train a LoRA network on SDXL.",
                                 support=SUPPORT_TRAIN_NETWORK, add_recipe_arguments=_add_arguments)


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
                        metadata=lora_metadata_for_run, families=("sdxl",))


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
