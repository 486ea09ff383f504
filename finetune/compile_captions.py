"""Turn image/caption file pairs into a Hugging Face imagefolder ``metadata.jsonl`` ({"file_name", "text"}).

    python finetune/compile_captions.py /path/to/captions/dir                  # metadata.jsonl in that folder
    python finetune/compile_captions.py /path/to/captions/dir /path/to/output  # ... or in another folder

Sub-folders are included; a caption file's lines are joined with spaces; images without a caption and
captions without an image are listed, not silently dropped.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import ArgumentParser  # noqa: E402
from library.errors import run_cli  # noqa: E402


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="compile_captions.py", description="Create a Hugging Face datasets compatible caption "
                       "file (metadata.jsonl) from image/caption file pairs")
    p.add_argument("dataset_dir", help="folder with the images and their caption files (searched recursively)")
    p.add_argument("output_dir", nargs="?", default=None,
                   help="folder for metadata.jsonl (default: dataset_dir); file_name paths are relative to it")
    p.add_argument("--caption_extension", default=".txt", help="extension of the caption files (default .txt)")
    return p


def main(argv: list[str] | None = None) -> Path:
    from library.captioners.data import compile_metadata

    args = build_parser().parse_args(argv)
    path, scan = compile_metadata(args.dataset_dir, args.output_dir, args.caption_extension)
    if scan.report():
        print(scan.report())
    print(f"wrote {len(scan.pairs)} image/caption pairs to {path}")
    return path


if __name__ == "__main__":
    run_cli(lambda: (main(), 0)[1])
