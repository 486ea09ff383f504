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

from library.errors import run_cli  # noqa: E402
from library.models.lumina.arguments import add_lumina_arguments  # noqa: E402
from library.training.lora_script import build_lora_parser, run_lora_script  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return build_lora_parser(prog="lumina_train_network.py", description="Train a Lumina Image 2.0 LoRA.",
                             add_family_arguments=add_lumina_arguments, network_module="networks.lora_lumina")


def main(argv: list[str] | None = None) -> Path | None:
    """Run a training from command-line arguments; returns the final LoRA file (None with --debug_dataset or
    --output_config)."""
    from library.models.lumina.arguments import lumina_ss_metadata
    from library.models.lumina.recipe import LuminaLoRARecipe

    return run_lora_script(build_parser(), argv, LuminaLoRARecipe, tracker_name="lumina_network_train",
                           families=("lumina",), metadata_extras=lambda run: lumina_ss_metadata(run.args))


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
