"""Generated data for the VLM tests: coloured shapes with captions, and a yes/no rule ("is the shape red?")."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, colour: str, path: Path, *, size: int = 64, centre: tuple[int, int] | None = None,
         radius: int = 20) -> Path:
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    x, y = centre or (size // 2, size // 2)
    rgb = COLOURS[colour]
    if shape == "circle":
        d.ellipse((x - radius, y - radius, x + radius, y + radius), fill=rgb)
    elif shape == "square":
        d.rectangle((x - radius, y - radius, x + radius, y + radius), fill=rgb)
    else:
        d.polygon([(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)], fill=rgb)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def conversation(image: str, question: str, answer: str) -> dict[str, Any]:
    return {"image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                              {"from": "gpt", "value": answer}]}


def shapes_dataset(root: Path) -> dict[str, Path]:
    """12 shapes (4 colours x 3 shapes): 8 in train.json, 4 in eval.jsonl; answers 'a red circle'."""
    items = []
    for colour in COLOURS:
        for shape in SHAPES:
            name = f"{colour}_{shape}.png"
            draw(shape, colour, root / name)
            items.append(conversation(name, "What is this?", f"a {colour} {shape}"))
    random.Random(0).shuffle(items)
    (root / "train.json").write_text(json.dumps(items[:8], indent=1), encoding="utf-8")
    (root / "eval.jsonl").write_text("\n".join(json.dumps(x) for x in items[8:]) + "\n", encoding="utf-8")
    return {"folder": root, "train": root / "train.json", "eval": root / "eval.jsonl"}


def yesno_dataset(root: Path, n_train: int = 40, n_eval: int = 20) -> dict[str, Path]:
    """Circles of random position and size; the answer is Yes for red ones (half of them), else No."""
    rng = random.Random(1)

    def make(n: int, tag: str) -> list[dict[str, Any]]:
        items = []
        for i in range(n):
            colour = "red" if i % 2 == 0 else rng.choice(["blue", "green", "yellow"])
            name = f"{tag}_{i}.png"
            draw("circle", colour, root / name, centre=(rng.randint(14, 50), rng.randint(14, 50)),
                 radius=rng.randint(8, 13))
            items.append(conversation(name, "Is the shape red?", "Yes" if colour == "red" else "No"))
        return items

    (root / "train.json").write_text(json.dumps(make(n_train, "tr")), encoding="utf-8")
    (root / "eval.json").write_text(json.dumps(make(n_eval, "ev")), encoding="utf-8")
    return {"folder": root, "train": root / "train.json", "eval": root / "eval.json"}


def held_out_loss(model: Any, family: Any, tokenizer: Any, data: Path, folder: Path) -> float:
    """Mean next-token loss of a model on a data file's supervised tokens (independent of the training run)."""
    from library.vlm.data import DataOptions, load_conversations
    from library.vlm.encoding import ConversationEncoder, collate, model_inputs

    encoder = ConversationEncoder(family, tokenizer)
    samples = load_conversations(data, DataOptions(folder))
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            batch = collate(family, [encoder.encode(sample)], tokenizer.pad_token_id)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**model_inputs(batch, torch.device("cpu"), torch.float32)).loss) * n
            count += n
    return total / count
