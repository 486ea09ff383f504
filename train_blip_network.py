"""Train a LoRA (PEFT adapter) on a BLIP captioning model from image/caption pairs.

    python finetune/compile_captions.py /path/to/pairs        # optional: metadata.jsonl
    accelerate launch train_blip_network.py /path/to/pairs loras/my-blip --epochs 5

Caption a folder with it: python finetune/make_captions.py images --model_id <base> --peft_model loras/my-blip.
See docs/captioner_training.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO")  # reproducible CPU kernels (bit-exact resume)

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from library.errors import run_cli  # noqa: E402

DESCRIPTION = """Caption trainer for BLIP (a PEFT LoRA on BlipForConditionalGeneration).

The dataset folder holds metadata.jsonl (finetune/compile_captions.py) and the images, or image/caption
file pairs (a.png + a.txt). The adapter is written to output_dir."""


def build_parser() -> argparse.ArgumentParser:
    from library.captioners.arguments import Defaults, build_captioner_parser
    from library.captioners.families import BLIP

    return build_captioner_parser(BLIP, prog="train_blip_network.py", description=DESCRIPTION,
                                  defaults=Defaults(learning_rate=1e-3, batch_size=2), positional=True)


def main(argv: list[str] | None = None) -> Path | None:
    """Train from command-line arguments; returns the adapter folder (None with --output_config)."""
    from library.captioners.families import BLIP
    from library.captioners.training import run_captioner_script
    from library.config.run_config import load_run_config

    args = load_run_config(build_parser(), argv)
    return None if args is None else run_captioner_script(args, BLIP)


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
