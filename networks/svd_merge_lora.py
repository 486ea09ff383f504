"""Merge LoRA files into one LoRA of a chosen rank: the SVD of the sum of their deltas.

    python networks/svd_merge_lora.py --save_to ab.safetensors --models a.safetensors b.safetensors \\
        --ratios 1 0.5 --new_rank 16 --new_conv_rank 8

Each module of the result is the best rank --new_rank approximation (--new_conv_rank for 3x3 LoCon convs) of
sum(ratio * up @ down * alpha / r); alpha = rank. See docs/lora_tools.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import ArgumentParser  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.lora_tools import common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save_to", default=None, help="output LoRA file (.safetensors, .ckpt or .pt)")
    p.add_argument("--models", nargs="*", default=None, help="LoRA files to merge")
    p.add_argument("--ratios", type=float, nargs="*", default=None, help="one ratio per LoRA (default 1.0 each)")
    p.add_argument("--new_rank", type=int, default=4, help="rank of the result (default 4)")
    p.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 conv modules (default --new_rank)")
    common.add_lbws_argument(p)
    common.add_precision_arguments(p, precision=True)
    common.add_output_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    common.svd_merge_loras(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
