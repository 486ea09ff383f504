"""Caption images with BLIP. Options as sd-scripts' finetune/make_captions.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import run_cli  # noqa: E402
from library.tools.blip_captioner import build_parser, run  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
