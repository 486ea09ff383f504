"""The old command-line layout (以前の指定形式): ``--train_data_dir`` / ``--reg_data_dir`` / ``--in_json``.

DreamBooth style: ``--train_data_dir`` is the *parent* of folders named ``<repeats>_<identifier> <class>``
(``10_sks dog``: 10 repeats, class tokens ``sks dog``); ``--reg_data_dir`` likewise holds ``<repeats>_<class>``
folders of regularization images. Fine-tuning style: ``--in_json`` metadata, ``--train_data_dir`` as the
image folder, ``--dataset_repeats`` as num_repeats. The result is the same :class:`RawConfig` a config file
gives, so all checks and precedence rules apply unchanged.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from library.config.params import DatasetSupport
from library.config.raw import RawConfig, RawDataset, RawSubset
from library.dataset.image_files import list_images
from library.errors import UserError

_REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")

LAYOUT_EXAMPLE = """\
  train_data_dir/            <- give this folder to --train_data_dir
    10_sks dog/              <- 10 repeats, caption 'sks dog' for images without a caption file
      img001.png
      img001.caption         (optional caption file)
    5_cpc rabbit/
      ...
  reg_data_dir/              <- --reg_data_dir (optional regularization images)
    1_dog/
      ..."""


def _folder_subsets(option: str, root: Path, is_reg: bool, notes: list[str]) -> list[RawSubset]:
    """Subsets for the ``<N>_<tokens>`` folders in ``root``; anything else is reported in ``notes``."""
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise UserError(f"{option} {root} {what}. It must be the folder that holds '<repeats>_<name>' folders:\n"
                        f"{LAYOUT_EXAMPLE}")
    subsets: list[RawSubset] = []
    ignored: list[str] = []
    zero_repeats: list[str] = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        match = _REPEAT_FOLDER.match(entry.name)
        if match is None:
            ignored.append(entry.name)
            continue
        repeats, tokens = int(match.group(1)), match.group(2).strip()
        if repeats < 1:
            notes.append(f"{option}: folder '{entry.name}' skipped: its repeat count is 0")
            zero_repeats.append(entry.name)
            continue
        values = {"image_dir": str(entry), "num_repeats": repeats, "is_reg": is_reg}
        if tokens:
            values["class_tokens"] = tokens
        subsets.append(RawSubset(values=values, place=f"{option} {entry.name}"))
    loose_images = list_images(root)
    if not subsets:
        what = "regularization images" if is_reg else "training data"
        example = root / ("1_dog" if is_reg else "10_sks dog")
        if zero_repeats:
            names = ", ".join(repr(n) for n in zero_repeats)
            raise UserError(
                f"No {what} found in {option} {root}: its only '<repeats>_<name>' folders ({names}) have 0 "
                f"repeats, so they are skipped. Rename them with a repeat count of 1 or more, e.g. '{example}'.")
        found = (f"It holds {len(loose_images)} image(s) directly (e.g. '{loose_images[0].name}') but no "
                 "'<repeats>_<name>' folders" if loose_images else "It holds no '<repeats>_<name>' folders")
        others = f" (folders found: {', '.join(repr(n) for n in ignored)})" if ignored else ""
        raise UserError(
            f"No {what} found in {option} {root}. {found}{others}.\n"
            f"{option} must be the PARENT of folders named '<repeats>_<identifier> <class>', "
            f"the images go inside those folders:\n{LAYOUT_EXAMPLE}\n"
            f"Fix: move the images into e.g. '{example}', or use --dataset_config with "
            f"image_dir = '{root}' (see docs/dataset_config.md).")
    for name in ignored:
        notes.append(f"{option}: folder '{name}' ignored: its name does not start with a repeat count "
                     f"like '10_sks dog'")
    if loose_images:
        notes.append(f"{option}: {len(loose_images)} image(s) directly in {root} are not used: only images "
                     "inside the '<repeats>_<name>' folders are")
    return subsets


def old_style_config(args: argparse.Namespace, support: DatasetSupport, notes: list[str]) -> RawConfig:
    """Build the dataset description from ``--train_data_dir`` / ``--reg_data_dir`` / ``--in_json``."""
    train_dir = getattr(args, "train_data_dir", None)
    in_json = getattr(args, "in_json", None) if support.finetuning else None
    raw = RawConfig(general={}, datasets=[], source="command line", from_file=False)

    if in_json is not None or not support.dreambooth:
        if in_json is None:
            raise UserError(f"{support.script} needs training data: give --dataset_config CONFIG.toml, or "
                            "--in_json META.json (made by the finetune/ metadata tools) with --train_data_dir IMAGES")
        values: dict = {"metadata_file": str(in_json)}
        if train_dir is not None:
            values["image_dir"] = str(train_dir)
        dataset = RawDataset(values={}, place="command line", subsets=[RawSubset(values, f"--in_json {in_json}")])
        if getattr(args, "reg_data_dir", None):
            notes.append("--reg_data_dir ignored: fine-tuning style datasets (--in_json) have no regularization images")
        raw.datasets.append(dataset)
        return raw

    if train_dir is None:
        raise UserError(f"{support.script} needs training data: give --dataset_config CONFIG.toml, or "
                        f"--train_data_dir FOLDER laid out as:\n{LAYOUT_EXAMPLE}")
    subsets = _folder_subsets("--train_data_dir", Path(train_dir), False, notes)
    reg_dir = getattr(args, "reg_data_dir", None)
    if reg_dir is not None:
        subsets += _folder_subsets("--reg_data_dir", Path(reg_dir), True, notes)
    raw.datasets.append(RawDataset(values={}, place="command line", subsets=subsets))
    return raw
