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

from library.errors import run_cli  # noqa: E402
from library.training.lora_script import build_lora_parser, run_lora_script  # noqa: E402


def _add_sdxl_arguments(parser: argparse.ArgumentParser) -> None:
    from library.training.sdxl_full import add_sdxl_model_arguments

    add_sdxl_model_arguments(parser.add_argument_group("SDXL"))


def build_parser() -> argparse.ArgumentParser:
    return build_lora_parser(prog="sdxl_train_network.py", description="Train a LoRA network on SDXL.",
                             add_family_arguments=_add_sdxl_arguments)


def main(argv: list[str] | None = None) -> Path | None:
    """Run a training from command-line arguments; returns the final LoRA file (None with --debug_dataset or
    --output_config)."""
    from library.training.recipes import LoRARecipe

    return run_lora_script(build_parser(), argv, LoRARecipe, tracker_name="network_train", families=("sdxl",))


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
