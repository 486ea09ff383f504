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

from library.errors import run_cli  # noqa: E402
from library.models.flux.arguments import add_flux_arguments  # noqa: E402
from library.training.lora_script import build_lora_parser, run_lora_script  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return build_lora_parser(prog="flux_train_network.py", description="Train a FLUX.1 LoRA.",
                             add_family_arguments=add_flux_arguments, network_module="networks.lora_flux")


def main(argv: list[str] | None = None) -> Path | None:
    """Run a training from command-line arguments; returns the final LoRA file (None with --debug_dataset or
    --output_config)."""
    from library.models.flux.arguments import flux_ss_metadata
    from library.models.flux.recipe import FluxLoRARecipe

    return run_lora_script(build_parser(), argv, FluxLoRARecipe, tracker_name="flux_network_train", families=("flux",),
                           metadata_extras=lambda run: flux_ss_metadata(run.args, run.models.family))


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
