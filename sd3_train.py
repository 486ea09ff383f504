"""Fine-tune a whole SD3 / SD3.5 model (the MMDiT; CLIP-L and CLIP-G with --train_text_encoder, T5 too with
--train_t5xxl), as sd-scripts' sd3_train.py.

    accelerate launch sd3_train.py --pretrained_model_name_or_path sd3.5_medium.safetensors \
        --clip_l clip_l.safetensors --clip_g clip_g.safetensors --t5xxl t5xxl_fp16.safetensors \
        --dataset_config data.toml --output_dir out --output_name my_sd3 --learning_rate 1e-5 \
        --mixed_precision bf16 --full_bf16 --gradient_checkpointing

See docs/sd3.md for the SD3 options; the others are those of fine_tune.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from library.config.arguments import SUPPORT_SDXL_TRAIN  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.models.sd3.full import SD3FullWeightRecipe, add_sd3_full_arguments  # noqa: E402
from library.training.full_recipe import FINE_TUNING, build_full_parser, run_full_training  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return build_full_parser("sd3_train.py", "Fine-tuning of a whole SD3 / SD3.5 model.", SUPPORT_SDXL_TRAIN,
                             FINE_TUNING, extra=add_sd3_full_arguments)


def main(argv: list[str] | None = None) -> Path | None:
    """Run a fine-tuning from command-line arguments; returns the final model (a file, or a folder for the
    diffusers formats); None with --debug_dataset or --output_config."""
    return run_full_training(build_parser(), argv, SUPPORT_SDXL_TRAIN, FINE_TUNING, tracker_name="sd3_finetuning",
                             recipe_class=SD3FullWeightRecipe, families=("sd3",))


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
