"""Train a LoRA (PEFT adapter) on a Florence-2 model (native transformers class) from image/caption pairs.

    python finetune/compile_captions.py /path/to/pairs        # optional: metadata.jsonl
    accelerate launch train_florence_lora.py --dataset_dir /path/to/pairs --output_dir loras/my-florence

Caption a folder with it: python finetune/make_captions_by_florence2.py images --peft_model loras/my-florence.
See docs/captioner_training.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO")  # reproducible CPU kernels (bit-exact resume)

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from library.errors import run_cli  # noqa: E402

DESCRIPTION = """Florence-2 trainer (a PEFT LoRA on Florence2ForConditionalGeneration).

The dataset folder holds metadata.jsonl (finetune/compile_captions.py) and the images, or image/caption
file pairs (a.png + a.txt). The adapter is written to --output_dir; the task prompt (--task)
goes to the encoder with each image."""


def build_parser() -> argparse.ArgumentParser:
    from library.captioners.arguments import Defaults, build_captioner_parser
    from library.captioners.families import FLORENCE2

    return build_captioner_parser(FLORENCE2, prog="train_florence_lora.py", description=DESCRIPTION,
                                  defaults=Defaults(learning_rate=1e-4, batch_size=1), positional=False)


def main(argv: list[str] | None = None) -> Path | None:
    """Train from command-line arguments; returns the adapter folder (None with --output_config)."""
    from library.captioners.families import FLORENCE2
    from library.captioners.training import run_captioner_script
    from library.config.run_config import load_run_config

    args = load_run_config(build_parser(), argv)
    return None if args is None else run_captioner_script(args, FLORENCE2)


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
