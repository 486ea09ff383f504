"""Extended textual inversion (XTI, P+) for Stable Diffusion 1.x / 2.x: one set of token embeddings per UNet
cross-attention block (16 for SD1/SD2), saved with one key per block (IN01 ... MID ... OUT11).

    accelerate launch train_textual_inversion_XTI.py --pretrained_model_name_or_path model.safetensors \
        --train_data_dir train --resolution 512 --output_dir out --token_string mychar --init_word girl \
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
from library.training.textual_inversion import (SUPPORT_XTI, build_textual_inversion_parser,  # noqa: E402
                                                run_textual_inversion)


def build_parser() -> argparse.ArgumentParser:
    return build_textual_inversion_parser("train_textual_inversion_XTI.py",
                                          "Train XTI (P+) embeddings: one set per UNet cross-attention block.",
                                          SUPPORT_XTI)


def main(argv: list[str] | None = None) -> Path | None:
    """Run an XTI training; returns the final embedding file (None with --debug_dataset or --output_config)."""
    return run_textual_inversion(build_parser(), argv, SUPPORT_XTI, xti=True)


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
