"""Train a FLUX.1 (dev or schnell) LoRA with sd-scripts' options and file format.

    accelerate launch flux_train_network.py --pretrained_model_name_or_path flux1-dev.safetensors \
        --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors \
        --dataset_config data.toml --output_dir out --output_name my_flux_lora --network_dim 16

See docs/flux.md for every FLUX option.
"""

from __future__ import annotations

import os

# reproducible MKL kernels on CPU (bit-exact resume), as in train_network.py
os.environ.setdefault("MKL_CBWR", "AUTO")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from library.config.arguments import SUPPORT_TRAIN_NETWORK  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.models.flux.arguments import add_flux_arguments  # noqa: E402
from library.training.network_args import add_network_arguments  # noqa: E402
from library.training.parser import build_training_parser  # noqa: E402


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    add_network_arguments(parser)
    add_flux_arguments(parser)
    parser.set_defaults(network_module="networks.lora_flux")


def build_parser() -> argparse.ArgumentParser:
    return build_training_parser(prog="flux_train_network.py", description="Train a FLUX.1 LoRA.",
                                 support=SUPPORT_TRAIN_NETWORK, add_recipe_arguments=_add_recipe_arguments)


def main(argv: list[str] | None = None) -> Path | None:
    """Run a training from command-line arguments; returns the final LoRA file (None with --debug_dataset or
    --output_config)."""
    from library.config.run_config import load_run_config
    from library.models.flux.arguments import flux_ss_metadata
    from library.models.flux.recipe import FluxLoRARecipe
    from library.training.loop import run_training
    from library.training.lora_metadata import lora_metadata_for_run

    args = load_run_config(build_parser(), argv)
    if args is None:
        return None

    def metadata(run):
        return {**lora_metadata_for_run(run), **flux_ss_metadata(run.args, run.models.family)}

    return run_training(args, FluxLoRARecipe(args), SUPPORT_TRAIN_NETWORK, tracker_name="flux_network_train",
                        metadata=metadata, families=("flux",))


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
