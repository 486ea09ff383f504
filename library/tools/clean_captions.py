"""Cleaning of fine-tuning metadata: danbooru-style tags and BLIP-style captions.

Tags: underscores become spaces (emoticons like ``^_^`` are kept), a DeepDanbooru ``, rating...`` tail is
cut, for images of several people (``girls``/``boys``) the per-person attributes that contradict each
other (hair length, hair colour, hairstyle, eye colour, sleeves) are removed when more than one is
present, and a one-word tag is dropped when a longer tag ends with it (``shirt`` beside ``white shirt``).
Captions: phrases that BLIP tends to produce are normalised (``anime girl`` → ``girl``, ``women`` → ``girls``…)
until nothing changes.
"""

from __future__ import annotations

import re

from library.errors import UserError

PERSON_ATTRIBUTE_PATTERNS = [
    r"^(long|short|medium|very long|very short) hair$",
    r"^(bob|hime) cut$",
    r"^[\w ]+ eyes$",
    r"^(long|short) sleeves$|^sleeveless$",
    r"^(ponytail|side ponytail|high ponytail|low ponytail|braid|twin braids|single braid|ahoge|twintails|"
    r"[\w ]+ bun|two side up|two tails|sidelocks|hair bun|double bun|drill hair|twin drills)$",
    r"^(?!(long|short|medium|very long|very short) hair$)[\w ]+ hair$",
]

CAPTION_REPLACEMENTS = [
    ("anime anime", "anime"),
    ("young ", ""),
    ("anime girl", "girl"),
    ("cartoon female", "girl"),
    ("cartoon lady", "girl"),
    ("cartoon character", "girl"),
    ("cartoon woman", "girl"),
    ("cartoon girl", "girl"),
    ("anime female", "girl"),
    ("anime lady", "girl"),
    ("anime character", "girl"),
    ("anime woman", "girl"),
    ("lady", "girl"),
    ("female", "girl"),
    ("woman", "girl"),
    ("person", "girl"),
    ("cartoon women", "girls"),
    ("anime women", "girls"),
    ("women", "girls"),
    ("people", "girls"),
    ("a cartoon figure", "a figure"),
    ("a cartoon image", "an image"),
    ("a cartoon picture", "a picture"),
    ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"),
    ("a cartoon drawing", "a drawing"),
    ("girl girl", "girl"),
]


def _underscores_to_spaces(tag: str) -> str:
    return tag if re.fullmatch(r"\W*_\W*", tag) else tag.replace("_", " ")


def clean_tags(text: str) -> str:
    """Clean a comma-separated tag string."""
    cut = text.find(", rating")
    if cut >= 0:
        text = text[:cut]
    tags = [_underscores_to_spaces(t.strip()) for t in text.split(",") if t.strip()]
    if any("girls" in t or "boys" in t for t in tags):
        for pattern in PERSON_ATTRIBUTE_PATTERNS:
            matches = [t for t in tags if re.match(pattern, t)]
            if len(matches) > 1:
                tags = [t for t in tags if t not in matches]
    words = [t for t in tags if " " not in t]
    tags = [t for t in tags if not (t in words and any(o != t and o.endswith(" " + t) for o in tags))]
    return ", ".join(tags)


def clean_caption(text: str) -> str:
    """Normalise a generated caption; replacements are applied until the text stops changing."""
    previous = None
    while previous != text:
        previous = text
        for old, new in CAPTION_REPLACEMENTS:
            text = re.sub(rf"\b{re.escape(old)}", new, text) if old[0].isalnum() else text.replace(old, new)
    return text.strip()


def clean_metadata(metadata: dict[str, dict], source: str = "metadata") -> tuple[dict[str, dict], list[str]]:
    """Cleaned copy of ``metadata`` and notes about entries without tags or caption.

    A ``tags`` or ``caption`` that is not text is a :class:`UserError` naming ``source`` and every such entry."""
    bad = [f"'{key}': `{field}` must be text, found {type(entry[field]).__name__}"
           for key, entry in metadata.items() for field in ("tags", "caption")
           if field in entry and not isinstance(entry[field], str)]
    if bad:
        raise UserError.from_problems(f"{source}: cannot clean it", bad)
    notes = []
    cleaned = {}
    for key, entry in metadata.items():
        entry = dict(entry)
        if "tags" in entry:
            entry["tags"] = clean_tags(entry["tags"])
        if "caption" in entry:
            entry["caption"] = clean_caption(entry["caption"])
        if "tags" not in entry and "caption" not in entry:
            notes.append(f"{key}: has neither tags nor caption")
        cleaned[key] = entry
    return cleaned, notes
