"""The user's dataset description before resolution: a config file's tables, or the old-style folders.

Both sources end up as a :class:`RawConfig`, so validation, precedence and duplicate handling are shared.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.config.schema import did_you_mean, describe_value
from library.errors import UserError


@dataclass
class RawSubset:
    values: dict[str, Any]
    place: str  # datasets[0].subsets[1], or "--train_data_dir 10_sks dog"


@dataclass
class RawDataset:
    values: dict[str, Any]
    place: str
    subsets: list[RawSubset] = field(default_factory=list)


@dataclass
class RawConfig:
    general: dict[str, Any]
    datasets: list[RawDataset]
    source: str  # the config file path, or "command line"
    from_file: bool = True

    def where(self, place: str) -> str:
        """Prefix of a problem message: file and place (old-style places already name the option)."""
        return f"{self.source}: {place}" if self.from_file else place


def read_config_text(path: Path) -> str:
    """A config file's text: UTF-8, with or without the BOM that some Windows editors write."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start} is 0x{err.object[err.start]:02x}); "
                        "save the file with UTF-8 encoding") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror or err})") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a dataset config (JSON for ``.json``, TOML otherwise); syntax errors name file, line and column."""
    path = Path(path)
    if not path.is_file():
        hint = " (it is a folder; give the .toml file)" if path.is_dir() else ""
        raise UserError(f"dataset config not found: {path}{hint}")
    text = read_config_text(path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON: {err.msg} (at line {err.lineno}, column {err.colno})") from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"{path}: not valid TOML: {err}. Check quotes: Windows paths are easiest in "
                            "single quotes, e.g. image_dir = 'C:\\images'") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a table with [general] and [[datasets]], found {describe_value(data)}")
    return data


def structure(data: dict[str, Any], source: str) -> tuple[RawConfig, list[str]]:
    """Split parsed file content into levels; problems with the overall shape are returned, not raised."""
    problems: list[str] = []
    raw = RawConfig(general={}, datasets=[], source=source)
    for key in data:
        if key not in ("general", "datasets"):
            hint = did_you_mean(key, ["general", "datasets"])
            hint = hint or " Only [general] and [[datasets]] belong at the top level."
            problems.append(f"{source}: top level: unknown key `{key}`.{hint}")
    general = data.get("general", {})
    if isinstance(general, dict):
        raw.general = dict(general)
    elif isinstance(general, list) and all(isinstance(g, dict) for g in general):
        problems.append(f"{source}: top level: write [general] with single brackets (there is one general "
                        "table), found [[general]]")
    else:
        problems.append(f"{source}: top level: `general` must be a table ([general]), found {describe_value(general)}")
    datasets = data.get("datasets")
    if datasets is None:
        problems.append(f"{source}: no [[datasets]]: add at least one [[datasets]] with a [[datasets.subsets]] "
                        "that names image_dir")
        return raw, problems
    if isinstance(datasets, dict) and "subsets" in datasets:
        problems.append(f"{source}: [[datasets.subsets]] must follow a [[datasets]] line: add [[datasets]] "
                        "above the first [[datasets.subsets]] (and above each group of subsets that forms a dataset)")
        return raw, problems
    if isinstance(datasets, dict):
        problems.append(f"{source}: `datasets` must be written [[datasets]] (double brackets: a list of datasets), "
                        "found [datasets]")
        return raw, problems
    if not isinstance(datasets, list):
        problems.append(f"{source}: `datasets` must be a list of tables ([[datasets]]), "
                        f"found {describe_value(datasets)}")
        return raw, problems
    for i, ds in enumerate(datasets):
        place = f"datasets[{i}]"
        if not isinstance(ds, dict):
            problems.append(f"{source}: {place}: expected a table ([[datasets]]), found {describe_value(ds)}")
            continue
        values = {k: v for k, v in ds.items() if k != "subsets"}
        dataset = RawDataset(values=values, place=place)
        subsets = ds.get("subsets")
        if subsets is None or subsets == []:
            problems.append(f"{source}: {place}: has no [[datasets.subsets]]: add one per image folder, "
                            "e.g. [[datasets.subsets]] image_dir = 'C:\\images'")
        elif isinstance(subsets, dict):
            problems.append(f"{source}: {place}: `subsets` must be written [[datasets.subsets]] (double brackets), "
                            "found [datasets.subsets]")
        elif not isinstance(subsets, list):
            problems.append(f"{source}: {place}: `subsets` must be a list of tables ([[datasets.subsets]]), "
                            f"found {describe_value(subsets)}")
        else:
            for j, ss in enumerate(subsets):
                sub_place = f"{place}.subsets[{j}]"
                if isinstance(ss, dict):
                    dataset.subsets.append(RawSubset(values=dict(ss), place=sub_place))
                else:
                    problems.append(f"{source}: {sub_place}: expected a table ([[datasets.subsets]]), "
                                    f"found {describe_value(ss)}")
        raw.datasets.append(dataset)
    return raw, problems
