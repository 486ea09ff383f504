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

from library.errors import run_cli  # noqa: E402
from library.models.sd3.arguments import add_sd3_arguments, add_sd3_lora_arguments  # noqa: E402
from library.training.lora_script import build_lora_parser, run_lora_script  # noqa: E402


def _add_sd3_arguments(parser: argparse.ArgumentParser) -> None:
    add_sd3_arguments(parser)
    add_sd3_lora_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    return build_lora_parser(prog="sd3_train_network.py", description="Train an SD3 / SD3.5 LoRA.",
                             add_family_arguments=_add_sd3_arguments, network_module="networks.lora_sd3")


def main(argv: list[str] | None = None) -> Path | None:
    """Run a training from command-line arguments; returns the final LoRA file (None with --debug_dataset or
    --output_config)."""
    from library.models.sd3.arguments import sd3_ss_metadata
    from library.models.sd3.recipe import SD3LoRARecipe

    return run_lora_script(build_parser(), argv, SD3LoRARecipe, tracker_name="sd3_network_train", families=("sd3",),
                           metadata_extras=lambda run: sd3_ss_metadata(run.args))


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
