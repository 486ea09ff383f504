"""WD14 tagger labels and tag selection: from per-tag probabilities to the ordered tag list of one image.

Two label layouts exist. SmilingWolf repositories ship ``selected_tags.csv`` (columns ``tag_id,name,
category,count``; category 9 = rating, 0 = general, 4 = character) and a model that outputs probabilities.
Repositories in the cl_tagger layout ship ``tag_mapping.json`` (``{"<index>": {"tag": ..., "category":
"General"}}``) and a model that outputs logits.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from library.errors import UserError

CSV_CATEGORIES = {"9": "rating", "0": "general", "4": "character"}
MAPPING_CATEGORIES = ("rating", "general", "character", "copyright", "meta", "model", "quality", "artist")


@dataclass(frozen=True)
class Labels:
    names: list[str]
    categories: list[str]  # one of MAPPING_CATEGORIES per output
    sorted_by_probability: bool  # the tag_mapping layout orders tags by probability, the CSV one by file order
    logits: bool  # the model outputs logits (sigmoid needed)


def load_selected_tags_csv(path: Path) -> Labels:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:3] != ["tag_id", "name", "category"]:
        raise UserError(f"{path}: the header must start with tag_id,name,category (a SmilingWolf selected_tags.csv)")
    names, categories = [], []
    for number, row in enumerate(rows[1:], 2):
        if len(row) < 3:
            raise UserError(f"{path}: line {number} has fewer than 3 columns")
        names.append(row[1])
        categories.append(CSV_CATEGORIES.get(row[2].strip(), "general"))
    return Labels(names, categories, sorted_by_probability=False, logits=False)


def load_tag_mapping_json(path: Path) -> Labels:
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
        items = sorted(((int(k), v["tag"], str(v["category"]).lower()) for k, v in mapping.items()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{path}: expected {{\"<index>\": {{\"tag\": ..., \"category\": ...}}}} ({err})") from err
    if [i for i, _, _ in items] != list(range(len(items))):
        raise UserError(f"{path}: tag indices must be 0..{len(items) - 1} without gaps")
    unknown = sorted({c for _, _, c in items} - set(MAPPING_CATEGORIES))
    if unknown:
        raise UserError(f"{path}: unknown categories {unknown}; known: {', '.join(MAPPING_CATEGORIES)}")
    return Labels([t for _, t, _ in items], [c for _, _, c in items], sorted_by_probability=True, logits=True)


def parse_tag_list(text: str | None, separator: str) -> list[str]:
    """``--undesired_tags`` / ``--always_first_tags``: split on the separator (stripped), items stripped."""
    if not text:
        return []
    sep = separator.strip() or ","
    return [t.strip() for t in text.split(sep) if t.strip()]


def parse_tag_replacement(text: str | None) -> dict[str, str]:
    """``"src1,dst1;src2,dst2"``; ``\\,`` and ``\\;`` stand for literal commas and semicolons."""
    if not text:
        return {}
    comma, semicolon = "\0c", "\0s"
    escaped = text.replace("\\,", comma).replace("\\;", semicolon)
    result: dict[str, str] = {}
    for pair in escaped.split(";"):
        if not pair.strip():
            continue
        parts = pair.split(",")
        if len(parts) != 2 or not parts[0].strip():
            raise UserError(f"--tag_replacement: {pair.replace(comma, ',').replace(semicolon, ';')!r} is not "
                            "'source,replacement' (separate pairs with ';', write a literal comma as \\,)")
        src, dst = (p.strip().replace(comma, ",").replace(semicolon, ";") for p in parts)
        result[src] = dst
    return result


@dataclass
class TagOptions:
    thresholds: dict[str, float]  # per category; above 1 disables the category
    remove_underscore: bool = False
    undesired: set[str] = field(default_factory=set)
    replacement: dict[str, str] = field(default_factory=dict)
    character_tag_expand: bool = False
    character_tags_first: bool = False
    rating: str | None = None  # None, "first" or "last"
    quality: str | None = None  # None, "first" or "last" (tag_mapping layout only)
    always_first: list[str] = field(default_factory=list)


def _expand_character(tag: str) -> list[str]:
    """``name_(series)`` -> ``name``, ``series``."""
    if tag.endswith(")") and "(" in tag:
        cut = tag.rindex("(")
        name, series = tag[:cut].rstrip("_").strip(), tag[cut + 1 : -1]
        if name and series:
            return [name, series]
    return [tag]


def _text_form(tag: str, category: str, opts: TagOptions) -> list[str]:
    tags = _expand_character(tag) if opts.character_tag_expand and category == "character" else [tag]
    if opts.remove_underscore:
        tags = [t.replace("_", " ") if len(t) > 3 else t for t in tags]
    return [opts.replacement.get(t, t) for t in tags]


def select_tags(probs: Sequence[float], labels: Labels, opts: TagOptions) -> dict[str, list[str]]:
    """Tags of one image by category (``rating``, ``character``, ``general``, ...) and in caption order (``all``).

    Rating (and quality) take the most probable label of their category, without a threshold; the other
    categories keep every tag at or above their threshold. Undesired tags are matched in their output form.
    """
    if len(probs) != len(labels.names):
        raise UserError(f"the model has {len(probs)} outputs but its label file lists {len(labels.names)} tags; "
                        "the model file and the label file do not belong together")
    best: dict[str, tuple[float, int]] = {}
    picked: list[tuple[float, int]] = []
    for i, (p, category) in enumerate(zip(probs, labels.categories)):
        p = float(p)
        if category in ("rating", "quality"):
            if category not in best or p > best[category][0]:
                best[category] = (p, i)
        elif p >= opts.thresholds.get(category, math.inf):
            picked.append((p, i))
    if labels.sorted_by_probability:
        picked.sort(key=lambda item: (-item[0], item[1]))
    chosen = [i for _, i in picked] + [best[c][1] for c in ("rating", "quality") if c in best]
    tagged = [(labels.categories[i], tag) for i in chosen
              for tag in _text_form(labels.names[i], labels.categories[i], opts) if tag not in opts.undesired]

    by_category: dict[str, list[str]] = {}
    for category, tag in tagged:
        by_category.setdefault(category, []).append(tag)
    front = "character" if opts.character_tags_first else None
    ordered = [t for c, t in tagged if c == front] + [t for c, t in tagged if c not in (front, "rating", "quality")]
    ordered = list(dict.fromkeys(ordered))
    for category, where in (("quality", opts.quality), ("rating", opts.rating)):
        tags = by_category.get(category, [])
        if where == "first":
            ordered = tags + [t for t in ordered if t not in tags]
        elif where == "last":
            ordered = [t for t in ordered if t not in tags] + tags
    if opts.always_first:
        leading = [t for t in opts.always_first if t in ordered]
        ordered = leading + [t for t in ordered if t not in leading]
    by_category["all"] = ordered
    return by_category


def merge_tags(existing: str, new: list[str], separator: str) -> list[str]:
    """``--append_tags``: the existing tags in their order, then the new ones not already there."""
    old = [t.strip() for t in existing.split(separator.strip() or ",") if t.strip()]
    return old + [t for t in new if t not in old]
