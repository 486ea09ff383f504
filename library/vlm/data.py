"""VLM training data: the lmms-finetune JSON / JSONL format, and caption folders as "describe this image" sets.

A sample is ``{"image": str | [str, ...], "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...], "system_prompt": str?}``; turns alternate user/assistant starting with
the user, each ``<image>`` in a user turn stands for the next image, and image paths are relative to
``--image_folder`` (or absolute). The otake-code fork's variants are read too: ``images`` for ``image`` and
``conversations`` as a list of strings (user, assistant, ...). Every problem is reported at once, each naming the
file, line and sample, before any model loads.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from library.errors import UserError

IMAGE_PLACEHOLDER = "<image>"
KNOWN_KEYS = ("image", "images", "video", "conversations", "system_prompt", "id")
DEFAULT_CAPTION_PROMPT = "Describe this image."
MAX_SHOWN_PROBLEMS = 20


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str


@dataclass
class Sample:
    images: list[Path]
    turns: list[Turn]
    system_prompt: str | None = None
    where: str = ""  # "train.json line 12 (sample 3)": used in every message about the sample
    extra: dict[str, Any] = field(default_factory=dict)

    def answer(self) -> str | None:
        """The last assistant turn (the gold answer), if the sample ends with one."""
        return self.turns[-1].text if self.turns and self.turns[-1].role == "assistant" else None

    def prompt_turns(self) -> list[Turn]:
        """The turns without the final answer: what a model is asked at inference."""
        return self.turns[:-1] if self.answer() is not None else list(self.turns)


@dataclass(frozen=True)
class DataOptions:
    image_folder: Path | None = None
    user_key: str = "human"
    assistant_key: str = "gpt"
    require_answer: bool = True  # training needs a final assistant turn; inference may ask without one


def _json_records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line, value) of each element of a JSON list, or of each line of a JSONL file."""
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
        return
    decoder = json.JSONDecoder()
    start = _skip_space(text, 0)
    if not text.startswith("[", start):
        raise UserError(f"{path}: a JSON data file must hold a list of samples ([{{...}}, ...]); for one sample per "
                        "line name it .jsonl")
    pos = _skip_space(text, start + 1)
    while pos < len(text) and text[pos] != "]":
        line = text.count("\n", 0, pos) + 1
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
        yield line, value
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)
        elif pos < len(text) and text[pos] != "]":
            bad = text.count("\n", 0, pos) + 1
            raise UserError(f"{path} line {bad}: expected ',' or ']' between samples")
    if pos >= len(text):
        raise UserError(f"{path}: the JSON list is not closed with ']'")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def load_conversations(path: str | Path, options: DataOptions) -> list[Sample]:
    """Read and check a JSON / JSONL file; a :class:`UserError` lists every problem found."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read data file {path} as UTF-8 text: {err}") from None
    if options.image_folder is not None and not options.image_folder.is_dir():
        raise UserError(f"--image_folder {options.image_folder} does not exist or is not a folder")
    samples: list[Sample] = []
    problems: list[str] = []
    for index, (line, record) in enumerate(_json_records(path, text)):
        where = f"{path.name} line {line} (sample {index + 1})"
        sample, sample_problems = _parse_sample(record, where, options)
        problems.extend(f"{where}: {p}" for p in sample_problems)
        if sample is not None and not sample_problems:
            samples.append(sample)
    if problems:
        shown = problems[:MAX_SHOWN_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise UserError.from_problems(f"data file {path}", shown)
    if not samples:
        raise UserError(f"data file {path} holds no samples")
    return samples


def _parse_sample(record: Any, where: str, options: DataOptions) -> tuple[Sample | None, list[str]]:
    if not isinstance(record, dict):
        return None, [f"a sample must be a JSON object, got {type(record).__name__}"]
    problems = [_unknown_key_message(key) for key in record if key not in KNOWN_KEYS]
    problems = [p for p in problems if p]
    if "video" in record:
        problems.append("video samples are not supported (images only)")
    turns, turn_problems = _parse_turns(record.get("conversations"), options)
    problems += turn_problems
    images, image_problems = _parse_images(record, options)
    problems += image_problems
    system = record.get("system_prompt")
    if system is not None and not isinstance(system, str):
        problems.append(f"'system_prompt' must be a string, got {type(system).__name__}")
    if not turn_problems and not image_problems:
        placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns if t.role == "user")
        if placeholders != len(images):
            problems.append(f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the user turns but {len(images)} "
                            f"image(s); put one {IMAGE_PLACEHOLDER} where each image goes")
    extra = {k: v for k, v in record.items() if k not in ("image", "images", "conversations", "system_prompt")}
    return Sample(images, turns, system, where, extra), problems


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.75)
    return f"unknown key '{key}'; did you mean '{close[0]}'?" if close else ""


def _parse_turns(conversations: Any, options: DataOptions) -> tuple[list[Turn], list[str]]:
    if not isinstance(conversations, list) or not conversations:
        return [], ["'conversations' must be a non-empty list of turns"]
    roles = {options.user_key: "user", options.assistant_key: "assistant"}
    turns: list[Turn] = []
    for i, item in enumerate(conversations):
        expected = "user" if i % 2 == 0 else "assistant"
        if isinstance(item, str):  # the fork's [question, answer] lists
            turns.append(Turn(expected, item))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("value"), str) or "from" not in item:
            return [], [f"conversations[{i}] must be an object with 'from' and a string 'value'"]
        role = roles.get(item["from"])
        if role is None:
            return [], [f"conversations[{i}]: 'from' is {item['from']!r}; expected {options.user_key!r} or "
                        f"{options.assistant_key!r} (--user_key / --assistant_key set these)"]
        if role != expected:
            return [], [f"conversations[{i}] is a {role} turn where a {expected} turn belongs: turns must alternate, "
                        "starting with the user"]
        turns.append(Turn(role, item["value"]))
    problems = []
    if any(IMAGE_PLACEHOLDER in t.text for t in turns if t.role == "assistant"):
        problems.append(f"an assistant turn contains {IMAGE_PLACEHOLDER}; images belong in user turns")
    if options.require_answer and turns[-1].role != "assistant":
        problems.append("the last turn is a user turn: a training sample must end with the assistant's answer")
    return turns, problems


def _parse_images(record: dict[str, Any], options: DataOptions) -> tuple[list[Path], list[str]]:
    value = record.get("image", record.get("images"))
    if value is None:
        return [], []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        return [], ["'image' must be a file name or a list of file names"]
    images, problems = [], []
    for name in names:
        path = Path(name)
        if not path.is_absolute():
            if options.image_folder is None:
                problems.append(f"image '{name}' is a relative path: pass --image_folder (the folder it is relative "
                                "to)")
                continue
            path = options.image_folder / path
        if not path.is_file():
            problems.append(f"image file {path} does not exist")
        images.append(path)
    return images, problems


def caption_folder_samples(folder: str | Path, *, caption_extension: str = ".txt", prompt: str = DEFAULT_CAPTION_PROMPT,
                           recursive: bool = False) -> list[Sample]:
    """Every image with a caption file beside it, as a one-turn "describe this image" conversation."""
    from library.dataset.captions import read_caption_file
    from library.dataset.image_files import list_images

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"caption folder {folder} does not exist or is not a folder")
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    samples, missing = [], 0
    for image in list_images(folder, recursive):
        caption_file = image.with_suffix(ext)
        if not caption_file.is_file():
            missing += 1
            continue
        caption = read_caption_file(caption_file).replace("\n", " ")
        if not caption:
            missing += 1
            continue
        turns = [Turn("user", f"{IMAGE_PLACEHOLDER}\n{prompt}"), Turn("assistant", caption)]
        samples.append(Sample([image], turns, None, f"{image.relative_to(folder)} ({caption_file.name})"))
    if not samples:
        raise UserError(f"no image in {folder} has a {ext} caption beside it"
                        + ("" if recursive else " (add --recursive to search sub-folders)"))
    if missing:
        print(f"{missing} image(s) in {folder} have no {ext} caption and are not used")
    return samples
