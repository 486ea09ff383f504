"""Train a Lumina Image 2.0 LoRA with sd-scripts' options and file format.

    accelerate launch lumina_train_network.py --pretrained_model_name_or_path lumina_2_model_bf16.safetensors \
        --gemma2 gemma_2_2b_fp16.safetensors --ae ae.safetensors \
        --dataset_config data.toml --output_dir out --output_name my_lumina_lora --network_dim 16

See docs/lumina.md for every Lumina option.
"""

from __future__ import annotations

import os

# reproducible MKL kernels on CPU (bit-exact resume), as in train_network.py
os.environ.setdefault("MKL_CBWR", "AUTO")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from library.config.arguments import SUPPORT_TRAIN_NETWORK  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.models.lumina.arguments import add_lumina_arguments  # noqa: E402
from library.training.network_args import add_network_arguments  # noqa: E402
from library.training.parser import build_training_parser  # noqa: E402


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    add_network_arguments(parser)
    add_lumina_arguments(parser)
    parser.set_defaults(network_module="networks.lora_lumina")


def build_parser() -> argparse.ArgumentParser:
    return build_training_parser(prog="lumina_train_network.py", description="Train a Lumina Image 2.0 LoRA.",
                                 support=SUPPORT_TRAIN_NETWORK, add_recipe_arguments=_add_recipe_arguments)


def main(argv: list[str] | None = None) -> Path | None:
    """Run a training from command-line arguments; returns the final LoRA file (None with --debug_dataset or
    --output_config)."""
    from library.config.run_config import load_run_config
    from library.models.lumina.arguments import lumina_ss_metadata
    from library.models.lumina.recipe import LuminaLoRARecipe
    from library.training.loop import run_training
    from library.training.lora_metadata import lora_metadata_for_run

    args = load_run_config(build_parser(), argv)
    if args is None:
        return None

    def metadata(run):
        return {**lora_metadata_for_run(run), **lumina_ss_metadata(run.args)}

    return run_training(args, LuminaLoRARecipe(args), SUPPORT_TRAIN_NETWORK, tracker_name="lumina_network_train",
                        metadata=metadata, families=("lumina",))


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
