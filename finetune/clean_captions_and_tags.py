"""Clean the captions and tags of a fine-tuning metadata JSON file.

Example:
    python finetune/clean_captions_and_tags.py meta.json meta_clean.json
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import ArgumentParser  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.io_utils import check_output_file  # noqa: E402
from library.tools.clean_captions import clean_metadata  # noqa: E402
from library.tools.metadata_files import load_metadata, save_metadata  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="in_json out_json",
                   help="input and output metadata files (the old form 'train_data_dir in_json out_json' is accepted)")
    p.add_argument("--debug", action="store_true", help="print every cleaned entry")
    args = p.parse_args(argv)
    if len(args.paths) == 3:
        print("note: the train_data_dir argument is no longer needed and is ignored")
        args.paths = args.paths[1:]
    if len(args.paths) != 2:
        p.error("expected: in_json out_json")
    in_json, out_json = args.paths
    check_output_file(out_json, "out_json", overwrite=True, example="meta_clean.json")
    cleaned, notes = clean_metadata(load_metadata(in_json), source=in_json)
    for note in notes:
        print(f"warning: {note}")
    if args.debug:
        for key, entry in cleaned.items():
            print(f"{key}: {entry}")
    save_metadata(out_json, cleaned)
    print(f"wrote {len(cleaned)} cleaned entries to {out_json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
