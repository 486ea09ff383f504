"""Builders shared by the dataset tests: parameter objects as the config validator would resolve them."""

from __future__ import annotations

from pathlib import Path

from library.config.params import (
    DatasetGroupParams,
    DatasetParams,
    DreamBoothSubsetParams,
    FineTuningSubsetParams,
)


def db_subset(image_dir: Path, origin: str = "datasets[0].subsets[0]", **kw) -> DreamBoothSubsetParams:
    return DreamBoothSubsetParams(origin=origin, image_dir=str(image_dir), **kw)


def ft_subset(metadata_file: Path, image_dir: Path | None = None, origin: str = "datasets[0].subsets[0]",
              **kw) -> FineTuningSubsetParams:
    return FineTuningSubsetParams(origin=origin, image_dir=str(image_dir) if image_dir else None,
                                  metadata_file=str(metadata_file), **kw)


def dataset(subsets, origin: str = "datasets[0]", kind: str = "dreambooth", **kw) -> DatasetParams:
    kw.setdefault("resolution", (128, 128))
    kw.setdefault("min_bucket_reso", 64)
    kw.setdefault("max_bucket_reso", 256)
    return DatasetParams(origin=origin, kind=kind, subsets=list(subsets), **kw)


def group_params(*datasets: DatasetParams, source: str = "test.toml") -> DatasetGroupParams:
    return DatasetGroupParams(datasets=list(datasets), source=source)


def make_folder(factory, folder: Path, sizes, captions=None, ext: str = ".png", caption_ext: str = ".caption",
                prefix: str = "img", seed: int = 0) -> list[Path]:
    """Images ``<prefix>NN<ext>`` of the given sizes, with caption files when ``captions`` is given."""
    paths = []
    for i, size in enumerate(sizes):
        p = factory(folder / f"{prefix}{i:02d}{ext}", size, seed=seed + i)
        if captions is not None and captions[i] is not None:
            p.with_name(p.stem + caption_ext).write_text(captions[i], encoding="utf-8")
        paths.append(p)
    return paths
