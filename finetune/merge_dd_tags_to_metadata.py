"""Merge the tags (e.g. from the WD14 tagger) of the images in a folder into a fine-tuning metadata JSON file.

Example:
    python finetune/merge_dd_tags_to_metadata.py train_images meta.json --full_path
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import run_cli  # noqa: E402
from library.tools.metadata_files import merge_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda: merge_cli(None, field="tags", default_extension=".txt", description=__doc__))
