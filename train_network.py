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

from library.errors import run_cli  # noqa: E402
from library.training.lora_script import build_lora_parser, run_lora_script  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return build_lora_parser(prog="train_network.py", description="Train a LoRA network.")


def main(argv: list[str] | None = None) -> Path | None:
    """Run a training from command-line arguments; returns the final LoRA file (None with --debug_dataset or
    --output_config)."""
    from library.training.recipes import LoRARecipe

    return run_lora_script(build_parser(), argv, LoRARecipe, tracker_name="network_train", families=("sd",))


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
