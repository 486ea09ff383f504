"""Merge LoRA files into a checkpoint (SD1.x/2.x, SDXL, FLUX.1, SD3/3.5, Lumina-2), or into one LoRA file.

    # into a checkpoint (single file, or a diffusers folder when --save_to has no suffix)
    python networks/merge_lora.py --sd_model model.safetensors --save_to merged.safetensors \\
        --models a.safetensors b.safetensors --ratios 0.8 0.5
    # into one LoRA: exact, the ranks are concatenated (rank = sum of ranks)
    python networks/merge_lora.py --save_to ab.safetensors --models a.safetensors b.safetensors --ratios 1 0.5

    # FLUX.1 with its text encoder files (sd-scripts' flux_merge_lora.py options; --flux_model = --sd_model)
    python networks/merge_lora.py --sd_model flux1-dev.safetensors --save_to merged.safetensors \
        --clip_l clip_l.safetensors --clip_l_save_to clip_l_merged.safetensors --models a.safetensors

The family is read from the files; --v2 is accepted and checked. See docs/lora_tools.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import ArgumentParser  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402
from library.lora_tools import common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd_model", "--flux_model", dest="sd_model", default=None,
                   help="checkpoint (.safetensors/.ckpt or diffusers folder) to merge into; without it the LoRAs "
                        "are merged into one LoRA")
    p.add_argument("--save_to", default=None, help="output: .safetensors/.ckpt file, or a folder (diffusers) for a "
                                                   "checkpoint; .safetensors/.ckpt/.pt for a LoRA")
    p.add_argument("--models", nargs="*", default=None, help="LoRA files to merge")
    p.add_argument("--ratios", type=float, nargs="*", default=None, help="one ratio per LoRA (default 1.0 each)")
    common.add_text_encoder_file_arguments(p)
    common.add_precision_arguments(p, precision=True)
    p.add_argument("--v2", action="store_true", help="the checkpoint is SD2.x (read from the file; checked if given)")
    p.add_argument("--v_parameterization", action="store_true",
                   help="the checkpoint is a v-prediction model (for a diffusers folder written from a single file)")
    p.add_argument("--concat", action="store_true",
                   help="concatenate the ranks (always done here: it is the exact merge; accepted for sd-scripts)")
    p.add_argument("--shuffle", action="store_true", help="shuffle the ranks of the merged LoRA (same deltas)")
    common.add_lbws_argument(p)
    common.add_output_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.sd_model is not None:
        common.merge_into_checkpoint(args)
    else:
        if args.v2 or args.v_parameterization:
            raise UserError("--v2/--v_parameterization describe --sd_model; without --sd_model they do not apply")
        beside = [f"--{o}" for o in ("clip_l", "clip_l_save_to", "t5xxl", "t5xxl_save_to") if getattr(args, o)]
        if beside:
            raise UserError(f"{', '.join(beside)}: text encoder files are merged beside a model; give --sd_model "
                            "(--flux_model) too (merging into text encoder files alone is not supported)")
        common.merge_into_lora(args)
    return 0


if __name__ == "__main__":
    run_cli(main)
