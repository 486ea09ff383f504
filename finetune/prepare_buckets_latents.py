"""Bucket the images of a folder, cache their latents for training and write train_resolution into the metadata.

Example (see docs/prepare_buckets_latents.md):
    python finetune/prepare_buckets_latents.py --full_path train_data meta_clean.json meta_lat.json model.safetensors
        --batch_size 4 --max_resolution 512,512 --mixed_precision no
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import run_cli  # noqa: E402
from library.tools.prepare_latents import main  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
