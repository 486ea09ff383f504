"""Caption images with Qwen2.5-VL. Options as musubi-tuner's caption_images_by_qwen_vl.py, plus batching,
--recursive, skipping captioned images (--overwrite) and resuming an interrupted JSONL."""

from library.errors import run_cli
from library.tools.qwen_vl_captioner import build_parser, run


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
