"""Train an SD3 / SD3.5 (Medium, Large) LoRA with sd-scripts' options and file format.

    accelerate launch sd3_train_network.py --pretrained_model_name_or_path sd3.5_medium.safetensors \
        --clip_l clip_l.safetensors --clip_g clip_g.safetensors --t5xxl t5xxl_fp16.safetensors \
        --dataset_config data.toml --output_dir out --output_name my_sd3_lora --network_dim 16

See docs/sd3.md for every SD3 option.
"""

from __future__ import annotations

import os

# reproducible MKL kernels on CPU (bit-exact resume), as in train_network.py
os.environ.setdefault("MKL_CBWR", "AUTO")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from library.config.arguments import SUPPORT_TRAIN_NETWORK  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.models.sd3.arguments import add_sd3_arguments, add_sd3_lora_arguments  # noqa: E402
from library.training.network_args import add_network_arguments  # noqa: E402
from library.training.parser import build_training_parser  # noqa: E402


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    add_network_arguments(parser)
    add_sd3_arguments(parser)
    add_sd3_lora_arguments(parser)
    parser.set_defaults(network_module="networks.lora_sd3")


def build_parser() -> argparse.ArgumentParser:
    return build_training_parser(prog="sd3_train_network.py", description="Train an SD3 / SD3.5 LoRA.",
                                 support=SUPPORT_TRAIN_NETWORK, add_recipe_arguments=_add_recipe_arguments)


def main(argv: list[str] | None = None) -> Path | None:
    """Run a training from command-line arguments; returns the final LoRA file (None with --debug_dataset or
    --output_config)."""
    from library.config.run_config import load_run_config
    from library.models.sd3.arguments import sd3_ss_metadata
    from library.models.sd3.recipe import SD3LoRARecipe
    from library.training.loop import run_training
    from library.training.lora_metadata import lora_metadata_for_run

    args = load_run_config(build_parser(), argv)
    if args is None:
        return None

    def metadata(run):
        return {**lora_metadata_for_run(run), **sd3_ss_metadata(run.args)}

    return run_training(args, SD3LoRARecipe(args), SUPPORT_TRAIN_NETWORK, tracker_name="sd3_network_train",
                        metadata=metadata, families=("sd3",))


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
