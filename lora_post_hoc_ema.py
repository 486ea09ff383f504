"""Merge LoRA (or full-model) safetensors checkpoints of one run into a post-hoc EMA.

Example:
    python lora_post_hoc_ema.py out/mylora-0000*.safetensors --output_file mylora_ema.safetensors --sigma_rel 0.2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from library.cli import ArgumentParser
from library.errors import UserError, run_cli
from library.io_utils import check_output_file
from library.tools import post_hoc_ema as ema


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="+", help="checkpoint .safetensors files of one training run")
    p.add_argument("--beta", type=float, default=0.95, help="decay of the running average (default 0.95)")
    p.add_argument("--beta2", type=float, default=None, help="decay at the last merge; linear from --beta to this")
    p.add_argument("--sigma_rel", type=float, default=None,
                   help="power-function EMA width (0 < sigma_rel < 0.2887); overrides --beta/--beta2")
    p.add_argument("--output_file", default=None, help="where to write the merged file (required unless --dry_run)")
    p.add_argument("--no_sort", action="store_true", help="merge in the given order instead of by modification time")
    p.add_argument("--dry_run", action="store_true", help="only print each checkpoint's weight in the result")
    p.add_argument("--overwrite", action="store_true", help="replace --output_file if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    files = ema.order_checkpoints(args.path, sort=not args.no_sort)
    if args.sigma_rel is not None and (args.beta != 0.95 or args.beta2 is not None):
        print("note: --sigma_rel is given, so --beta/--beta2 are ignored")
    betas = ema.merge_betas(len(files), args.beta, args.beta2, args.sigma_rel)
    print(ema.describe_weights(files, ema.effective_weights(betas)))
    if args.dry_run:
        return 0
    if not args.output_file:
        raise UserError("--output_file is required (or use --dry_run to only see the weights).")
    out = Path(args.output_file)
    if any(out.resolve() == f.resolve() for f in files):
        raise UserError(f"--output_file {out} is one of the input checkpoints; choose another name.")
    check_output_file(out, "--output_file", overwrite=args.overwrite, example="ema.safetensors")
    from library.models.metadata import save_safetensors

    result = ema.merge_checkpoints(files, betas)
    save_safetensors(out, result.tensors, result.metadata)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
