"""What may be written where in a dataset config, and how each value is type-checked.

Levels are ``general`` ([general]), ``dataset`` ([[datasets]]) and ``subset`` ([[datasets.subsets]]);
the table below follows the seeds (sd-scripts' config README). Type validators raise
:class:`voluptuous.Invalid` with messages written for people ("expected an integer, found 'ten' (string)").
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import voluptuous as vol

from library.config.params import DatasetSupport

GENERAL, DATASET, SUBSET = "general", "dataset", "subset"
ALL_LEVELS = frozenset({GENERAL, DATASET, SUBSET})
DATASET_LEVELS = frozenset({GENERAL, DATASET})
SUBSET_ONLY = frozenset({SUBSET})

COMMON, DREAMBOOTH, FINETUNING, DROPOUT = "common", "dreambooth", "finetuning", "dropout"

LEVEL_NAMES = {GENERAL: "[general]", DATASET: "[[datasets]]", SUBSET: "[[datasets.subsets]]"}


def describe_value(value: Any) -> str:
    """A found value in user terms: ``'ten' (string)``, ``3.5 (number)``, ``true (boolean)``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (boolean)"
    if isinstance(value, int):
        return f"{value} (integer)"
    if isinstance(value, float):
        return f"{value} (number)"
    if isinstance(value, str):
        return f"{value!r} (string)"
    if isinstance(value, list):
        return f"{value!r} (list)"
    if isinstance(value, dict):
        return "a table {" + ", ".join(list(value)[:4]) + ("...}" if len(value) > 4 else "}")
    return f"{value!r} ({type(value).__name__})"


def show_value(value: Any) -> str:
    """A resolved value as the user would write it in TOML: ``'txt'``, ``true``, ``[512, 768]``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    return repr(value)


def did_you_mean(word: str, candidates: list[str] | set[str] | tuple[str, ...]) -> str:
    """`` did you mean 'x'?`` for the closest candidate, or an empty string."""
    match = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f" did you mean {match[0]!r}?" if match else ""


def _unquote_hint(value: Any) -> str:
    """For '10' or 'true' written in quotes: how to write it as a number or boolean."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("true", "false"):
            return f" (write it without quotes: {text.lower()})"
        try:
            float(text)
        except ValueError:
            return ""
        return f" (write it without quotes: {text})"
    return ""


def _expect(what: str, hint_unquote: bool = False) -> Callable[[Any], vol.Invalid]:
    def invalid(value: Any) -> vol.Invalid:
        hint = _unquote_hint(value) if hint_unquote else ""
        return vol.Invalid(f"expected {what}, found {describe_value(value)}{hint}")

    return invalid


def v_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _expect("true or false", hint_unquote=True)(value)


def v_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _expect("an integer", hint_unquote=True)(value)


def v_float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise _expect("a finite number", hint_unquote=True)(value)


def v_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _expect("a string (text in quotes)")(value)


def v_table(value: Any) -> dict:
    if isinstance(value, dict):
        return value
    raise _expect("a table like {key = value}")(value)


def v_resolution(value: Any) -> tuple[int, int]:
    """``512`` or ``[512, 768]`` (width, height) -> (width, height)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return (value[0], value[1])
    raise _expect("a size like 512 or [width, height] like [512, 768]", hint_unquote=True)(value)


def v_float_pair(value: Any) -> tuple[float, float]:
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        return (float(value[0]), float(value[1]))
    raise _expect("two numbers like [1.0, 3.0]")(value)


@dataclass(frozen=True)
class Option:
    """One dataset config key: its validator, where it may be written, and which style it belongs to."""

    name: str
    validate: Callable[[Any], Any]
    levels: frozenset[str]
    style: str = COMMON
    cli: str | None = None  # dest of the command-line option that is the fallback below [general]
    target: str = SUBSET  # which resolved object the value lands in: dataset, subset, or both


def _opts() -> tuple[Option, ...]:
    ds = DATASET_LEVELS
    return (
        # per-dataset options
        Option("batch_size", v_int, ds, cli="train_batch_size", target=DATASET),
        Option("bucket_no_upscale", v_bool, ds, cli="bucket_no_upscale", target=DATASET),
        Option("bucket_reso_steps", v_int, ds, cli="bucket_reso_steps", target=DATASET),
        Option("enable_bucket", v_bool, ds, cli="enable_bucket", target=DATASET),
        Option("max_bucket_reso", v_int, ds, cli="max_bucket_reso", target=DATASET),
        Option("min_bucket_reso", v_int, ds, cli="min_bucket_reso", target=DATASET),
        Option("resolution", v_resolution, ds, cli="resolution", target=DATASET),
        Option("network_multiplier", v_float, ds, target=DATASET),
        Option("validation_split", v_float, ds, cli="validation_split", target=DATASET),
        Option("validation_seed", v_int, ds, cli="validation_seed", target=DATASET),
        # per-subset options that may also be written higher up
        Option("color_aug", v_bool, ALL_LEVELS, cli="color_aug"),
        Option("face_crop_aug_range", v_float_pair, ALL_LEVELS, cli="face_crop_aug_range"),
        Option("flip_aug", v_bool, ALL_LEVELS, cli="flip_aug"),
        Option("keep_tokens", v_int, ALL_LEVELS, cli="keep_tokens"),
        Option("num_repeats", v_int, ALL_LEVELS, cli="dataset_repeats"),
        Option("random_crop", v_bool, ALL_LEVELS, cli="random_crop"),
        Option("shuffle_caption", v_bool, ALL_LEVELS, cli="shuffle_caption"),
        Option("caption_prefix", v_str, ALL_LEVELS, cli="caption_prefix"),
        Option("caption_suffix", v_str, ALL_LEVELS, cli="caption_suffix"),
        Option("caption_separator", v_str, ALL_LEVELS, cli="caption_separator"),
        Option("keep_tokens_separator", v_str, ALL_LEVELS, cli="keep_tokens_separator"),
        Option("secondary_separator", v_str, ALL_LEVELS, cli="secondary_separator"),
        Option("enable_wildcard", v_bool, ALL_LEVELS, cli="enable_wildcard"),
        Option("token_warmup_min", v_int, ALL_LEVELS, cli="token_warmup_min"),
        Option("token_warmup_step", v_float, ALL_LEVELS, cli="token_warmup_step"),
        Option("custom_attributes", v_table, ALL_LEVELS),
        Option("resize_interpolation", v_str, ALL_LEVELS, cli="resize_interpolation", target="both"),
        # caption dropout (only for scripts that support it)
        Option("caption_dropout_rate", v_float, ALL_LEVELS, DROPOUT, cli="caption_dropout_rate"),
        Option("caption_dropout_every_n_epochs", v_int, ALL_LEVELS, DROPOUT, cli="caption_dropout_every_n_epochs"),
        Option("caption_tag_dropout_rate", v_float, ALL_LEVELS, DROPOUT, cli="caption_tag_dropout_rate"),
        # DreamBooth style
        Option("caption_extension", v_str, ALL_LEVELS, DREAMBOOTH, cli="caption_extension"),
        Option("cache_info", v_bool, ALL_LEVELS, DREAMBOOTH, cli="cache_info"),
        Option("class_tokens", v_str, SUBSET_ONLY, DREAMBOOTH),
        Option("is_reg", v_bool, SUBSET_ONLY, DREAMBOOTH),
        # fine-tuning style
        Option("metadata_file", v_str, SUBSET_ONLY, FINETUNING),
        # both styles, subset only
        Option("image_dir", v_str, SUBSET_ONLY),
        Option("alpha_mask", v_bool, SUBSET_ONLY, cli="alpha_mask"),
    )


OPTIONS: Mapping[str, Option] = MappingProxyType({o.name: o for o in _opts()})

# Command-line names users sometimes write in dataset configs, and what to write instead.
CLI_ONLY_HINTS: Mapping[str, str] = MappingProxyType({
    "train_batch_size": "write batch_size in dataset configs",
    "dataset_repeats": "write num_repeats in dataset configs",
    "train_data_dir": "in a dataset config each folder is a [[datasets.subsets]] with image_dir",
    "reg_data_dir": "write a [[datasets.subsets]] with image_dir and is_reg = true",
    "in_json": "write metadata_file in a [[datasets.subsets]]",
    "prior_loss_weight": "it is a command-line option (--prior_loss_weight)",
    "debug_dataset": "it is a command-line option (--debug_dataset)",
    "max_token_length": "it is a command-line option (--max_token_length)",
    "caption_extention": "did you mean 'caption_extension'? (the key is spelled caption_extension)",
})


def styles_for(kind: str, caption_dropout: bool) -> set[str]:
    """Option styles allowed in a subset/dataset of ``kind`` ('dreambooth', 'finetuning' or 'any')."""
    styles = {COMMON}
    if caption_dropout:
        styles.add(DROPOUT)
    if kind in (DREAMBOOTH, "any"):
        styles.add(DREAMBOOTH)
    if kind in (FINETUNING, "any"):
        styles.add(FINETUNING)
    return styles


def allowed_keys(level: str, styles: set[str]) -> dict[str, Option]:
    return {n: o for n, o in OPTIONS.items() if level in o.levels and o.style in styles}


def level_schema(level: str, styles: set[str]) -> vol.Schema:
    """The voluptuous schema of one level for the given option styles (extra keys are errors)."""
    keys: dict[Any, Any] = {}
    for name, opt in allowed_keys(level, styles).items():
        required = level == SUBSET and (
            (name == "image_dir" and styles & {DREAMBOOTH, FINETUNING} == {DREAMBOOTH})
            or (name == "metadata_file" and styles & {DREAMBOOTH, FINETUNING} == {FINETUNING}))
        keys[vol.Required(name) if required else vol.Optional(name)] = opt.validate
    return vol.Schema(keys, extra=vol.PREVENT_EXTRA)


def unknown_key_message(key: str, level: str, styles: set[str], support: DatasetSupport) -> str:
    """Why ``key`` is not allowed at ``level`` and what to write instead."""
    where = LEVEL_NAMES[level]
    script = support.script
    opt = OPTIONS.get(key)
    if opt is not None:
        if opt.style == DROPOUT and not support.caption_dropout:
            return f"`{key}` is not supported by {script} (it has no caption dropout); remove it"
        if level not in opt.levels:
            places = " or ".join(LEVEL_NAMES[lv] for lv in (GENERAL, DATASET, SUBSET) if lv in opt.levels)
            return f"`{key}` may only be set in {places}, not in {where}"
        if opt.style == DREAMBOOTH and not support.dreambooth:
            return f"`{key}` is a DreamBooth-style option and {script} only supports fine-tuning datasets; remove it"
        if opt.style == DREAMBOOTH:
            return (f"`{key}` is a DreamBooth-style option, but this is a fine-tuning dataset (its subsets have "
                    "metadata_file); remove it")
        if opt.style == FINETUNING:
            return (f"`{key}` is a fine-tuning option, but {script} only supports DreamBooth-style datasets "
                    "(folders of images with caption files); remove it")
    if key in CLI_ONLY_HINTS:
        return f"`{key}` is not a dataset config key: {CLI_ONLY_HINTS[key]}"
    allowed = set(allowed_keys(level, styles))
    hint = did_you_mean(key, allowed) or did_you_mean(key, set(OPTIONS))
    return f"unknown key `{key}` in {where}.{hint or ' See docs/dataset_config.md for the keys allowed here.'}"
