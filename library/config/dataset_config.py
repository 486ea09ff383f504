"""``--dataset_config`` validation and resolution into :class:`DatasetGroupParams`.

Precedence for every option: [[datasets.subsets]] > [[datasets]] > [general] > command line (only options
the user actually gave, i.e. different from the parser default) > default. Every problem in a config is
collected and reported in one :class:`UserError`.

Run ``python -m library.config.dataset_config CONFIG [--script train_network.py]`` to check a config and
see the resolved values.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import voluptuous as vol

from library.config.arguments import (
    RESIZE_INTERPOLATIONS,
    SUPPORT_BY_SCRIPT,
    add_dataset_arguments,
    dataset_parser,
    parse_float_range,
    parse_resolution,
)
from library.config.old_style import old_style_config
from library.config.params import (
    DatasetGroupParams,
    DatasetParams,
    DatasetSupport,
    DreamBoothSubsetParams,
    FineTuningSubsetParams,
)
from library.config.raw import RawConfig, RawSubset, read_config_file, structure
from library.config.schema import (
    DATASET,
    DREAMBOOTH,
    FINETUNING,
    GENERAL,
    OPTIONS,
    SUBSET,
    show_value,
    did_you_mean,
    level_schema,
    styles_for,
    unknown_key_message,
)
from library.errors import UserError, run_cli

logger = logging.getLogger(__name__)

MAX_RESOLUTION = 16384  # pixels per side: bounds resolution and bucket sizes
MAX_REPEATS = 1_000_000  # num_repeats; the plan's memory is also estimated before it is built (group.py)
_FULL_SUPPORT = DatasetSupport(dreambooth=True, finetuning=True, caption_dropout=True)
_CLI_CONVERTERS = {"resolution": parse_resolution, "face_crop_aug_range": parse_float_range}

Value = tuple[Any, str]  # (value, where it came from, in user terms)


def cli_values(args: argparse.Namespace) -> dict[str, Value]:
    """Dataset options the user gave on the command line (or in --config_file), keyed by config name."""
    defaults = dataset_parser(_FULL_SUPPORT)
    out: dict[str, Value] = {}
    for name, opt in OPTIONS.items():
        if opt.cli is None or not hasattr(args, opt.cli):
            continue
        value = getattr(args, opt.cli)
        if value is None or value == defaults.get_default(opt.cli):
            continue
        convert = _CLI_CONVERTERS.get(name)
        if convert is not None:
            try:
                value = convert(value)
            except ValueError as err:
                raise UserError(f"--{opt.cli}: {err}") from None
        out[name] = (value, f"--{opt.cli}")
    old_spelling = getattr(args, "caption_extention", None)
    if old_spelling is not None and "caption_extension" not in out:
        out["caption_extension"] = (old_spelling, "--caption_extention")
    return out


def _subset_kind(values: dict[str, Any], support: DatasetSupport) -> str:
    if not support.finetuning:
        return DREAMBOOTH
    if not support.dreambooth:
        return FINETUNING
    return FINETUNING if "metadata_file" in values else DREAMBOOTH


def _required_message(key: str, support: DatasetSupport) -> str:
    if key == "image_dir":
        return "`image_dir` is required: the folder that holds this subset's images, e.g. image_dir = 'C:\\images'"
    return (f"`metadata_file` is required: {support.script} trains only from fine-tuning datasets, so each "
            "subset needs metadata_file = 'meta.json' (made by the finetune/ metadata tools)")


def _validate_level(values: dict[str, Any], level: str, kind: str, where: str,
                    support: DatasetSupport) -> tuple[dict[str, Any], list[str]]:
    """Type-check one table; return its converted valid values and the problems found."""
    styles = styles_for(kind, support.caption_dropout)
    try:
        level_schema(level, styles)(values)
        errors: list[vol.Invalid] = []
    except vol.MultipleInvalid as err:
        errors = err.errors
    order = {k: i for i, k in enumerate(values)}
    found: list[tuple[int, str]] = []
    bad: set[str] = set()
    for e in errors:
        key = str(e.path[0]) if e.path else "?"
        bad.add(key)
        if e.error_message == "extra keys not allowed":
            msg = unknown_key_message(key, level, styles, support)
        elif e.error_message == "required key not provided":
            msg = _required_message(key, support)
        else:
            msg = f"`{key}`: {e.error_message}"
        found.append((order.get(key, len(order)), f"{where}: {msg}"))
    good = {k: OPTIONS[k].validate(v) for k, v in values.items() if k not in bad}
    return good, [m for _, m in sorted(found)]


def _validate_levels(raw: RawConfig, support: DatasetSupport) -> tuple[list[str], list[str]]:
    """Check every table against its level's schema (in place); returns (dataset kinds, problems)."""
    problems: list[str] = []
    general_kind = "any" if support.dreambooth and support.finetuning else _subset_kind({}, support)
    raw.general, found = _validate_level(raw.general, GENERAL, general_kind, raw.where("[general]"), support)
    problems += found
    kinds: list[str] = []
    for ds in raw.datasets:
        sub_kinds = [_subset_kind(s.values, support) for s in ds.subsets]
        kind = sub_kinds[0] if sub_kinds else _subset_kind({}, support)
        if len(set(sub_kinds)) > 1:
            db = ", ".join(s.place for s, k in zip(ds.subsets, sub_kinds) if k == DREAMBOOTH)
            ft = ", ".join(s.place for s, k in zip(ds.subsets, sub_kinds) if k == FINETUNING)
            problems.append(
                f"{raw.where(ds.place)}: mixes DreamBooth-style subsets ({db}: no metadata_file) and fine-tuning "
                f"subsets ({ft}: with metadata_file); the style is decided per dataset, so put them in "
                "separate [[datasets]]")
        kinds.append(kind)
        ds.values, found = _validate_level(ds.values, DATASET, kind, raw.where(ds.place), support)
        problems += found
        for s, sub_kind in zip(ds.subsets, sub_kinds):
            s.values, found = _validate_level(s.values, SUBSET, sub_kind, raw.where(s.place), support)
            problems += found
    return kinds, problems


class _Resolver:
    """Looks values up along subset > dataset > general > command line and checks them."""

    def __init__(self, raw: RawConfig, cli: dict[str, Value]):
        self.raw = raw
        self.cli = cli
        self.problems: list[str] = []

    def chain(self, *tables: tuple[dict[str, Any], str]) -> dict[str, Value]:
        """Resolved values (with their sources) for the given tables, most specific first."""
        out: dict[str, Value] = dict(self.cli)
        layers = list(tables) + [(self.raw.general, "[general]")]
        for values, source in reversed(layers):
            out.update({k: (v, source) for k, v in values.items()})
        return out

    def problem(self, place: str, key: str, value: Value, what: str) -> None:
        src = value[1]
        if src == "default":
            origin = "default"
        elif src.startswith("--"):
            origin = f"from {src} on the command line or in --config_file"
        else:
            origin = f"set in {src}"
        self.problems.append(f"{self.raw.where(place)}: `{key}` = {show_value(value[0])} ({origin}) {what}")

    def check_subset(self, place: str, v: dict[str, Value], kind: str) -> None:
        def num(key: str, low: float, high: float | None, what: str) -> None:
            if key in v and not (low <= v[key][0] and (high is None or v[key][0] <= high)):
                self.problem(place, key, v[key], what)

        num("num_repeats", 1, MAX_REPEATS, f"must be between 1 and {MAX_REPEATS:,}")
        num("keep_tokens", 0, None, "must be 0 or more")
        num("caption_dropout_rate", 0, 1, "must be between 0 and 1")
        num("caption_tag_dropout_rate", 0, 1, "must be between 0 and 1")
        num("caption_dropout_every_n_epochs", 0, None, "must be 0 (off) or more")
        num("token_warmup_min", 0, None, "must be 0 or more")
        num("token_warmup_step", 0, None, "must be 0 (off) or more")
        if "face_crop_aug_range" in v:
            lo, hi = v["face_crop_aug_range"][0]
            if not 0 < lo <= hi:
                self.problem(place, "face_crop_aug_range", v["face_crop_aug_range"],
                             "must be [low, high] with 0 < low <= high, e.g. [2.0, 4.0]")
        interp = v.get("resize_interpolation")
        if interp is not None and interp[0] not in RESIZE_INTERPOLATIONS:
            self.problem(place, "resize_interpolation", interp, "is not an interpolation; use one of "
                         f"{', '.join(RESIZE_INTERPOLATIONS)}.{did_you_mean(interp[0], RESIZE_INTERPOLATIONS)}")
        if "caption_separator" in v and v["caption_separator"][0] == "":
            self.problem(place, "caption_separator", v["caption_separator"], "must not be empty")
        if kind == DREAMBOOTH and "caption_extension" in v:
            ext = v["caption_extension"][0]
            if not ext.startswith(".") or len(ext) < 2:
                self.problem(place, "caption_extension", v["caption_extension"],
                             f"must start with a dot, e.g. '.{ext.lstrip('.') or 'txt'}'")
        for key, want_dir in (("image_dir", True), ("metadata_file", False)):
            if key not in v:
                continue
            path = Path(v[key][0])
            if not v[key][0].strip():
                self.problem(place, key, v[key], "must not be empty")
            elif not (path.is_dir() if want_dir else path.is_file()):
                what = ("is a file, not a folder" if want_dir else "is a folder, not a file") if path.exists() \
                    else f"does not exist (looked for {path.absolute()})"
                self.problem(place, key, v[key], what)

    def check_dataset(self, place: str, v: dict[str, Value]) -> None:
        if "resolution" in v and min(v["resolution"][0]) <= 0:
            self.problem(place, "resolution", v["resolution"], "must be positive")
        for key in ("resolution", "max_bucket_reso", "min_bucket_reso"):
            if key in v and max(_sides(v[key][0])) > MAX_RESOLUTION:
                self.problem(place, key, v[key], f"must be at most {MAX_RESOLUTION} pixels per side (no supported "
                             "model trains larger images; one such image alone would not fit in memory)")
        if "batch_size" in v and v["batch_size"][0] < 1:
            self.problem(place, "batch_size", v["batch_size"], "must be at least 1")
        if "validation_split" in v and not 0 <= v["validation_split"][0] < 1:
            self.problem(place, "validation_split", v["validation_split"], "must be at least 0 and below 1")
        if not v.get("enable_bucket", (False, ""))[0]:
            return
        defaults = DatasetParams(origin="", kind="dreambooth", subsets=[])

        def get(key: str) -> Value:
            return v.get(key, (getattr(defaults, key), "default"))

        steps, lo, hi = get("bucket_reso_steps"), get("min_bucket_reso"), get("max_bucket_reso")
        if steps[0] < 1:
            self.problem(place, "bucket_reso_steps", steps, "must be at least 1")
            return
        for key, reso in (("min_bucket_reso", lo), ("max_bucket_reso", hi)):
            if reso[0] <= 0 or reso[0] % steps[0]:
                down = max(steps[0], reso[0] - reso[0] % steps[0])
                self.problem(place, key, reso, f"must be a positive multiple of bucket_reso_steps = {steps[0]}; "
                             f"use e.g. {down} or {down + steps[0]}")
        if lo[0] > hi[0]:
            self.problem(place, "min_bucket_reso", lo, f"must not exceed max_bucket_reso = {hi[0]}")
        if "resolution" in v and 0 < lo[0] <= hi[0] and min(v["resolution"][0]) > 0:
            w, h = v["resolution"][0]
            if min(w, h) < lo[0] or max(w, h) > hi[0]:
                self.problem(place, "resolution", v["resolution"],
                             f"must lie within min_bucket_reso = {lo[0]} and max_bucket_reso = {hi[0]} when "
                             "enable_bucket is true")


def _sides(value: Any) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _subset_params(place: str, kind: str, v: dict[str, Any]) -> DreamBoothSubsetParams | FineTuningSubsetParams:
    cls = DreamBoothSubsetParams if kind == DREAMBOOTH else FineTuningSubsetParams
    names = {f.name for f in dataclasses.fields(cls)} - {"origin"}
    kwargs = {k: val for k, val in v.items() if k in names}
    for key in ("keep_tokens_separator", "secondary_separator"):
        if kwargs.get(key) == "":
            kwargs[key] = None
    return cls(origin=place, **kwargs)


def _resolve(raw: RawConfig, kinds: list[str], args: argparse.Namespace, notes: list[str]) -> tuple[
        list[DatasetParams], list[str]]:
    resolver = _Resolver(raw, cli_values(args))
    dataset_fields = {f.name for f in dataclasses.fields(DatasetParams)}
    datasets: list[DatasetParams] = []
    for ds, kind in zip(raw.datasets, kinds):
        dv = resolver.chain((ds.values, ds.place))
        resolver.check_dataset(ds.place, dv)
        subsets = []
        seen: dict[str, RawSubset] = {}
        for s in ds.subsets:
            sv = resolver.chain((s.values, s.place), (ds.values, ds.place))
            resolver.check_subset(s.place, sv, kind)
            key_name = "metadata_file" if kind == FINETUNING else "image_dir"
            if key_name in sv:
                key = os.path.normcase(os.path.abspath(sv[key_name][0]))
                if key in seen:
                    notes.append(f"{raw.where(s.place)} skipped: same {key_name} '{sv[key_name][0]}' as "
                                 f"{seen[key].place} in the same dataset (put it in another [[datasets]] to "
                                 "train it again, e.g. at another resolution)")
                    continue
                seen[key] = s
            subsets.append(_subset_params(s.place, kind, {k: val for k, (val, _) in sv.items()}))
        if subsets and all(getattr(s, "is_reg", False) for s in subsets):
            resolver.problems.append(f"{raw.where(ds.place)}: has only regularization subsets (is_reg = true); "
                                     "add a subset with the training images")
        kwargs = {k: val for k, (val, _) in dv.items()
                  if k in dataset_fields and k in OPTIONS and OPTIONS[k].target != SUBSET}
        for key in ("prior_loss_weight", "debug_dataset"):
            if hasattr(args, key):
                kwargs[key] = getattr(args, key)
        datasets.append(DatasetParams(origin=ds.place, kind=kind, subsets=subsets, **kwargs))
    return datasets, resolver.problems


def resolve_dataset_params(args: argparse.Namespace, support: DatasetSupport) -> DatasetGroupParams:
    """Validate ``--dataset_config`` (or the old-style folders) and resolve every dataset parameter."""
    notes: list[str] = []
    config = getattr(args, "dataset_config", None)
    if config:
        ignored = [f"--{n}" for n in ("train_data_dir", "reg_data_dir", "in_json") if getattr(args, n, None)]
        if ignored:
            notes.append(f"{', '.join(ignored)} ignored because --dataset_config {config} is given")
        raw, problems = structure(read_config_file(config), str(config))
    else:
        raw, problems = old_style_config(args, support, notes), []
    kinds, found = _validate_levels(raw, support)
    problems += found
    datasets, found = _resolve(raw, kinds, args, notes)
    problems += found
    if problems:
        # every problem of a config file starts with the file name, so the title does not repeat it
        title = "invalid dataset config" if config else "the training data options are invalid"
        raise UserError.from_problems(title, problems)
    for note in notes:
        logger.warning(note)
    return DatasetGroupParams(datasets=datasets, source=str(config) if config else "command line", skipped=notes)


def describe(group: DatasetGroupParams) -> str:
    """The resolved parameters as readable text (what ``python -m library.config.dataset_config`` prints)."""
    lines = [f"source: {group.source}"]
    for ds in group.datasets:
        lines.append(f"{ds.origin} ({ds.kind}, {len(ds.subsets)} subset(s))")
        for f in dataclasses.fields(ds):
            if f.name not in ("origin", "kind", "subsets"):
                lines.append(f"    {f.name} = {getattr(ds, f.name)!r}")
        for s in ds.subsets:
            lines.append(f"  {s.origin}")
            for f in dataclasses.fields(s):
                if f.name != "origin":
                    lines.append(f"      {f.name} = {getattr(s, f.name)!r}")
    lines += [f"note: {n}" for n in group.skipped]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m library.config.dataset_config",
                                     description="Check a dataset config and print the resolved parameters.")
    parser.add_argument("config", help="dataset config (.toml or .json)")
    parser.add_argument("--script", default="train_network.py", choices=sorted(SUPPORT_BY_SCRIPT),
                        help="the training script the config is meant for (default: train_network.py)")
    cli = parser.parse_args(argv)
    support = SUPPORT_BY_SCRIPT[cli.script]
    args_parser = argparse.ArgumentParser()
    add_dataset_arguments(args_parser, support)
    args = args_parser.parse_args(["--dataset_config", cli.config])
    print(describe(resolve_dataset_params(args, support)))
    print(f"OK: {cli.config} is valid for {cli.script}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
