"""Dataset benchmark: scanning + bucketing + plan for many small images, cold and with a warm cache_info.

    python bench/bench_dataset.py                      # 10,000 images in a temporary folder
    python bench/bench_dataset.py --dir /data/bench --count 20000 --batches 200

Creates synthetic images of varied sizes with caption files (kept when --dir is given, reused if present),
then times: a cold scan (header reads in parallel), a first scan with ``cache_info`` (writes
``metadata_cache.json``), a warm scan with ``cache_info``, the plan, and loading batches.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from library.config.params import DatasetGroupParams, DatasetParams, DreamBoothSubsetParams  # noqa: E402
from library.dataset import build_dataset_group, make_train_loader  # noqa: E402
from library.dataset.images import METADATA_CACHE_NAME  # noqa: E402


def make_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.caption"))) >= count:
        return
    rng = random.Random(0)
    base = np.random.default_rng(0).integers(0, 255, (160, 160, 3), dtype=np.uint8)
    for i in range(count):
        w, h = rng.choice([(64, 64), (96, 64), (64, 96), (160, 64), (64, 160), (64, 144), (80, 72), (120, 96)])
        ext = ".png" if i % 2 else ".jpg"
        Image.fromarray(base[:h, :w]).save(folder / f"img{i:05d}{ext}")
        (folder / f"img{i:05d}.caption").write_text(f"sks, tag{i % 17}, tag{i % 5}, photo", encoding="utf-8")


def params(folder: Path, cache_info: bool) -> DatasetGroupParams:
    sub = DreamBoothSubsetParams(origin="bench", image_dir=str(folder), cache_info=cache_info, num_repeats=2,
                                 shuffle_caption=True, flip_aug=True)
    ds = DatasetParams(origin="bench", kind="dreambooth", subsets=[sub], resolution=(128, 128), batch_size=8,
                       enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256)
    return DatasetGroupParams(datasets=[ds], source="bench")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="folder for the images (default: a temporary one)")
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--batches", type=int, default=100, help="batches to load in the loader timing")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader timing")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = (args.dir or Path(tmp)) / "images"
        _, t_make = timed(lambda: make_images(folder, args.count))
        (folder / METADATA_CACHE_NAME).unlink(missing_ok=True)
        group, t_cold = timed(lambda: build_dataset_group(params(folder, False), seed=0))
        _, t_first = timed(lambda: build_dataset_group(params(folder, True), seed=0))
        group, t_warm = timed(lambda: build_dataset_group(params(folder, True), seed=0))
        plan, t_plan = timed(lambda: group.plan(num_processes=2, grad_accum=2, epochs=10))
        loader = make_train_loader(group, seed=0, num_workers=args.workers, persistent_workers=True)

        def load():
            n = 0
            for n, _ in enumerate(loader, 1):
                if n >= args.batches:
                    break
            return n

        loaded, t_load = timed(load)
        n = len(group.train[0].images)
        rows = [
            ("create images (skipped if present)", t_make, ""),
            ("scan + bucket, cold (no cache_info)", t_cold, f"{n / t_cold:,.0f} images/s"),
            ("scan + bucket, cache_info first run", t_first, f"{n / t_first:,.0f} images/s"),
            ("scan + bucket, cache_info warm", t_warm, f"{n / t_warm:,.0f} images/s"),
            ("plan", t_plan, f"{len(plan.splitlines())} lines"),
            (f"load {loaded} batches of 8 ({args.workers} workers)", t_load, f"{loaded * 8 / t_load:,.0f} images/s"),
        ]
        print(f"{n} images, {len(group.train[0].buckets)} buckets, {group.batches_per_epoch()} batches per epoch")
        print(f"{'step':<44}{'seconds':>10}  rate")
        for name, t, rate in rows:
            print(f"{name:<44}{t:>10.3f}  {rate}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
