"""Change the rank of a LoRA file by SVD of each module's delta.

    python networks/resize_lora.py --model big.safetensors --save_to small.safetensors --new_rank 8
    python networks/resize_lora.py --model big.safetensors --save_to dyn.safetensors --new_rank 32 \\
        --dynamic_method sv_fro --dynamic_param 0.9 --verbose

Each module keeps its scale alpha / r; ss_network_dim / ss_network_alpha, the training comment and the hashes in
the metadata are updated, the rest is kept. See docs/lora_tools.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import ArgumentParser  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.lora_tools import common  # noqa: E402
from library.lora_tools.commands import run_resize  # noqa: E402
from library.lora_tools.lowrank import DYNAMIC_METHODS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="LoRA file to resize")
    p.add_argument("--save_to", default=None, help="output LoRA file (.safetensors, .ckpt or .pt)")
    p.add_argument("--new_rank", type=int, default=4, help="rank of the result; the cap with --dynamic_method "
                                                           "(default 4)")
    p.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 conv modules (default --new_rank)")
    p.add_argument("--dynamic_method", choices=DYNAMIC_METHODS, default=None,
                   help="choose each module's rank from its singular values (up to --new_rank)")
    p.add_argument("--dynamic_param", type=float, default=None,
                   help="target of --dynamic_method: sv_ratio >= 1 (largest/smallest kept), sv_fro and sv_cumulative "
                        "in (0, 1] (share of the Frobenius norm / of sum(S) to keep)")
    p.add_argument("--verbose", action="store_true", help="print the retained share of each module")
    common.add_precision_arguments(p, precision=False)
    common.add_output_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    run_resize(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
