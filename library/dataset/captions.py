"""Caption processing: prefix/suffix, dropout, multi-line and wildcard choice, keep/shuffle/warmup/tag dropout.

The order and the options are sd-scripts' (``BaseDataset.process_caption``), with its bugs fixed:

- ``keep_tokens_separator`` never reaches the text, even when nothing is shuffled or dropped;
- tags are re-joined with the ``caption_separator`` (``", "`` for the default ``","``), not always ``", "``;
- with multi-line captions the prefix/suffix go around the chosen line (sd-scripts attached the prefix to
  the first line and the suffix to the last one, and dropped the suffix without ``enable_wildcard``);
- empty tags (``"a, , b"``, a trailing separator) are dropped instead of being shuffled around;
- the token-warmup ratio is resolved per call instead of being written back into the subset.

All randomness comes from the ``rng`` argument, so a caption is reproducible from the caller's seed.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

from library.config.params import SubsetParams
from library.errors import UserError

_WILDCARD = re.compile(r"\{\{|\}\}|\{([^{}]+)\}")


def read_caption_file(path: str | Path) -> str:
    """A caption file's text: UTF-8 (a BOM is allowed), stripped, one caption per non-empty line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read caption file {path}: {err.strerror or err}") from err
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(
            f"caption file {path} is not valid UTF-8 (byte {err.start}); re-save it with UTF-8 encoding"
        ) from err
    lines = (line.strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def caption_dropped(subset: SubsetParams, *, rng: random.Random, epoch: int) -> bool:
    """Whether the whole caption is dropped: with ``caption_dropout_rate``, and on every
    ``caption_dropout_every_n_epochs``-th epoch (``epoch`` counts from 1, as in sd-scripts)."""
    if subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate:
        return True
    every = subset.caption_dropout_every_n_epochs
    return every > 0 and epoch > 0 and epoch % every == 0


def choose_line(caption: str, subset: SubsetParams, rng: random.Random) -> str:
    """One line of a multi-line caption: a random one with ``enable_wildcard``, else the first.

    Blank lines are ignored and the chosen line is stripped.
    """
    if "\n" not in caption:
        return caption
    lines = [line.strip() for line in caption.split("\n") if line.strip()]
    if not lines:
        return ""
    return rng.choice(lines) if subset.enable_wildcard else lines[0]


def expand_wildcards(text: str, rng: random.Random) -> str:
    """Replace each ``{a|b|c}`` by one random alternative; ``{{`` and ``}}`` are literal braces."""

    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        return rng.choice(match.group(1).split("|"))

    return _WILDCARD.sub(replace, text)


def join_separator(caption_separator: str) -> str:
    """How tags are re-joined: ``", "`` for the separator ``","``, otherwise the separator itself."""
    return ", " if caption_separator == "," else caption_separator


def warmup_steps(subset: SubsetParams, max_train_steps: int | None) -> int:
    """``token_warmup_step`` in steps: a value below 1 is a ratio of ``max_train_steps``."""
    value = subset.token_warmup_step
    if value <= 0:
        return 0
    if value < 1:
        if max_train_steps is None:
            raise ValueError("token_warmup_step is a ratio of max_train_steps, but max_train_steps is unknown")
        return math.floor(value * max_train_steps)
    return int(value)


def process_caption(
    caption: str,
    subset: SubsetParams,
    *,
    rng: random.Random,
    epoch: int,
    step: int,
    max_train_steps: int | None = None,
) -> str:
    """The caption as trained on at ``epoch`` (from 1) and global ``step`` (from 0). See the module docstring."""
    if caption_dropped(subset, rng=rng, epoch=epoch):
        return ""
    caption = choose_line(caption, subset, rng)
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    if subset.enable_wildcard:
        caption = expand_wildcards(caption, rng)

    separator = subset.caption_separator
    keep_separator = subset.keep_tokens_separator
    has_keep_separator = bool(keep_separator) and keep_separator in caption
    warmup = warmup_steps(subset, max_train_steps)
    if subset.shuffle_caption or warmup > 0 or subset.caption_tag_dropout_rate > 0 or has_keep_separator:
        fixed, flex, fixed_suffix = _split_tags(caption, subset, has_keep_separator)
        if warmup > 0 and step < warmup:
            count = math.floor(step * (len(flex) - subset.token_warmup_min) / warmup) + subset.token_warmup_min
            flex = flex[: max(count, 0)]
        if subset.shuffle_caption:
            rng.shuffle(flex)
        rate = subset.caption_tag_dropout_rate
        if rate > 0:
            flex = [tag for tag in flex if rng.random() >= rate]
        caption = join_separator(separator).join(fixed + flex + fixed_suffix)

    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, separator)
    return caption


def _split_tags(caption: str, subset: SubsetParams, has_keep_separator: bool) -> tuple[list[str], list[str], list[str]]:
    """(fixed prefix tags, flexible tags, fixed suffix tags)."""
    separator = subset.caption_separator

    def tags(text: str) -> list[str]:
        return [t.strip() for t in text.split(separator) if t.strip()]

    if has_keep_separator:
        parts = caption.split(subset.keep_tokens_separator)
        suffix = [tag for part in parts[2:] for tag in tags(part)]
        return tags(parts[0]), tags(parts[1]), suffix
    all_tags = tags(caption)
    keep = max(subset.keep_tokens, 0)
    return all_tags[:keep], all_tags[keep:], []


_ATTENTION = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\\]|\\\\|\\|   # escapes, and a lone backslash
    \(|\[|                          # openers
    :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|   # explicit weight closing a round bracket
    \)|\]|                          # closers
    [^\\()\[\]:]+|                  # plain text
    :
    """,
    re.X,
)
_ROUND = 1.1
_SQUARE = 1 / 1.1


def parse_weighted_caption(text: str) -> list[tuple[str, float]]:
    """Split a prompt in A1111 attention syntax into (text, weight) runs.

    ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:1.3)`` multiplies by 1.3; brackets nest and
    multiply. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters. Brackets left open apply to the
    end of the text; closers with no opener are literal. Neighbouring runs of equal weight are merged.
    """
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append([token[1:] or "\\", 1.0])
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), _ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), _SQUARE)
        else:
            runs.append([token, 1.0])

    for start in round_open:
        multiply(start, _ROUND)
    for start in square_open:
        multiply(start, _SQUARE)

    merged: list[list] = []
    for run in runs:
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    if not merged:
        return [("", 1.0)]
    return [(t, w) for t, w in merged]

