"""Textual inversion for SDXL: the token is added to both tokenizers and one embedding per text encoder is
trained (CLIP-L 768, OpenCLIP-bigG 1280), saved as ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` as sd-scripts,
A1111 and ComfyUI read it.

    accelerate launch sdxl_train_textual_inversion.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \
        --train_data_dir train --resolution 1024 --output_dir out --token_string mychar --init_word girl \
        --num_vectors_per_token 4 --learning_rate 1e-4 --max_train_steps 2000 --save_model_as safetensors

See docs/textual_inversion.md for every option.
"""

from __future__ import annotations

import os

# Reproducible CPU results (exact resume), as in train_network.py: set before torch loads.
os.environ.setdefault("MKL_CBWR", "AUTO")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from library.errors import run_cli  # noqa: E402
from library.training.textual_inversion import (SUPPORT_SDXL_TEXTUAL_INVERSION,  # noqa: E402
                                                build_textual_inversion_parser, run_textual_inversion)


def build_parser() -> argparse.ArgumentParser:
    return build_textual_inversion_parser("sdxl_train_textual_inversion.py",
                                          "Train textual-inversion embeddings for SDXL (both text encoders).",
                                          SUPPORT_SDXL_TEXTUAL_INVERSION)


def main(argv: list[str] | None = None) -> Path | None:
    """Run an SDXL textual-inversion training; returns the final embedding file (None with --debug_dataset or
    --output_config)."""
    return run_textual_inversion(build_parser(), argv, SUPPORT_SDXL_TEXTUAL_INVERSION, xti=False,
                                 families=("sdxl",))


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
