"""Extract a LoRA from the difference between a model and its fine-tune.

    python networks/extract_lora_from_models.py --model_org base.safetensors --model_tuned tuned.safetensors \\
        --save_to extracted.safetensors --dim 32 --conv_dim 16

The family (SD1.x/2.x, SDXL, FLUX.1) is read from the files; each text encoder is included when it differs by
more than --min_diff. See docs/lora_tools.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import ArgumentParser  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.lora_tools import common  # noqa: E402
from library.lora_tools.commands import run_extract  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_org", default=None, help="the original model (.safetensors/.ckpt or diffusers folder)")
    p.add_argument("--model_tuned", default=None, help="the fine-tuned model")
    p.add_argument("--save_to", default=None, help="output LoRA file (.safetensors, .ckpt or .pt)")
    p.add_argument("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    p.add_argument("--conv_dim", type=int, default=None,
                   help="rank of 3x3 conv (LoCon) modules; without it no conv modules are extracted")
    p.add_argument("--clamp_quantile", type=float, default=0.99,
                   help="clamp the factors' values at this quantile (default 0.99; 1 = no clamping)")
    p.add_argument("--min_diff", type=float, default=0.01,
                   help="the text encoder is extracted only if a weight differs by more than this (default 0.01)")
    p.add_argument("--load_precision", choices=common.PRECISION_CHOICES, default=None,
                   help="precision the models are loaded in (default float)")
    p.add_argument("--v2", action="store_true", help="SD2.x models (read from the files; checked if given)")
    p.add_argument("--v_parameterization", action="store_true", help="write v-prediction metadata")
    p.add_argument("--sdxl", action="store_true", help="accepted for sd-scripts: the family is read from the files "
                                                       "(checked if given)")
    p.add_argument("--load_original_model_to", default=None, help="accepted for sd-scripts; models load on the CPU")
    p.add_argument("--load_tuned_model_to", default=None, help="accepted for sd-scripts; models load on the CPU")
    common.add_precision_arguments(p, precision=False)
    common.add_output_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    run_extract(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
