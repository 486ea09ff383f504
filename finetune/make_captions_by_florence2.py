"""Caption images with Florence-2 (native transformers class), optionally with a LoRA from
train_florence_lora.py. See docs/captioner_training.md."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    from library.captioners.florence_captioner import build_parser, run

    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
