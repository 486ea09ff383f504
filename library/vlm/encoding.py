"""Samples -> token ids, labels and model inputs.

A conversation is written in the family's ChatML format as segments, each tokenized on its own: the system
block, user turns and each ``<|im_start|>assistant\\n`` prefix are context (label -100); each answer with its
``<|im_end|>`` is supervised (so the model learns to stop); the newline after it is context again. Image
placeholders are expanded to one token per image feature before tokenization, so ``--model_max_length``
counts image tokens, and a sample longer than it is an error or is dropped (never truncated into a loss of 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from library.errors import UserError
from library.vlm.data import IMAGE_PLACEHOLDER, Sample, Turn
from library.vlm.families import END_OF_TURN, VLMFamily

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    images: list[Path]
    image_tokens: int
    sample: Sample

    def __len__(self) -> int:
        return len(self.input_ids)


class ConversationEncoder:
    def __init__(self, family: VLMFamily, tokenizer: Any):
        self.family = family
        self.tokenizer = tokenizer
        self._check_tokens()

    def _check_tokens(self) -> None:
        for token in (self.family.image_token, END_OF_TURN, "<|im_start|>"):
            ids = self.tokenizer.encode(token, add_special_tokens=False)
            if len(ids) != 1:
                raise UserError(f"the tokenizer does not know {token} as one token (got {len(ids)} tokens): use the "
                                f"tokenizer that belongs to the {self.family.name} model")

    def segments(self, sample: Sample, *, for_generation: bool) -> list[tuple[str, bool]]:
        """(text, supervised) pieces of a sample; ``for_generation`` leaves out the gold answer and ends with the
        assistant prefix (the prompt ``vlm_infer.py`` gives the model)."""
        family = self.family
        pieces: list[tuple[str, bool]] = [(family.system_block(sample.system_prompt), False)]
        turns: list[Turn] = sample.prompt_turns() if for_generation else sample.turns
        for turn in turns:
            if turn.role == "user":
                pieces.append((family.user_block(turn.text.replace(IMAGE_PLACEHOLDER, family.image_marker())), False))
            else:
                pieces += [(family.assistant_prefix(), False), (turn.text + END_OF_TURN, True), ("\n", False)]
        if for_generation:
            pieces.append((family.assistant_prefix(), False))
        return [(text, supervised) for text, supervised in pieces if text]

    def image_token_counts(self, sample: Sample, sizes: Sequence[tuple[int, int]] | None = None) -> list[int]:
        """Image tokens of each image of the sample (``sizes``: the images' (width, height) when they are in
        memory rather than in files)."""
        if sizes is not None:
            return [self.family.count_image_tokens(w, h, len(sizes)) for w, h in sizes]
        counts = []
        for path in sample.images:
            try:
                with Image.open(path) as img:
                    width, height = img.size
            except (OSError, UnidentifiedImageError) as err:
                raise UserError(f"{sample.where}: cannot read image {path} ({err})") from None
            counts.append(self.family.count_image_tokens(width, height, len(sample.images)))
        return counts

    def encode(self, sample: Sample, *, for_generation: bool = False,
               sizes: Sequence[tuple[int, int]] | None = None) -> Encoded:
        counts = self.image_token_counts(sample, sizes)
        pending = list(counts)
        ids: list[int] = []
        labels: list[int] = []
        token = self.family.image_token
        for text, supervised in self.segments(sample, for_generation=for_generation):
            if not supervised and token in text:
                parts = text.split(token)
                text = parts[0]
                for part in parts[1:]:
                    text += token * (pending.pop(0) if pending else 1) + part
            piece = self.tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            labels += piece if supervised else [IGNORE_INDEX] * len(piece)
        found = sum(1 for i in ids if i == self.family.image_token_id())
        if pending or found != sum(counts):
            raise UserError(f"{sample.where}: the prompt holds {found} image tokens but its {len(counts)} image(s) "
                            f"need {sum(counts)}; remove literal {token} text from the conversation")
        return Encoded(ids, labels, list(sample.images), sum(counts), sample)


def encode_all(encoder: ConversationEncoder, samples: Sequence[Sample], *, max_length: int | None,
               drop_too_long: bool, name: str, for_generation: bool = False) -> list[Encoded]:
    """Encode every sample; one too long for ``max_length`` is an error naming each such sample, or (with
    ``drop_too_long``) is left out with a count."""
    from tqdm import tqdm

    encoded = [encoder.encode(s, for_generation=for_generation)
               for s in tqdm(samples, desc=f"tokenizing {name}", disable=len(samples) < 200)]
    if max_length is None:
        return encoded
    too_long = [e for e in encoded if len(e) > max_length]
    if not too_long:
        return encoded
    described = [f"{e.sample.where}: {len(e)} tokens ({e.image_tokens} of them image tokens)" for e in too_long]
    if not drop_too_long:
        shown = described[:10] + ([f"... and {len(described) - 10} more"] if len(described) > 10 else [])
        raise UserError.from_problems(
            f"{len(too_long)} {name} sample(s) are longer than --model_max_length {max_length} (which counts image "
            "tokens); raise --model_max_length, use smaller images, or pass --drop_too_long to leave them out", shown)
    kept = [e for e in encoded if len(e) <= max_length]
    print(f"dropped {len(too_long)} of {len(encoded)} {name} samples longer than --model_max_length {max_length} "
          f"(longest {max(len(e) for e in too_long)} tokens): {'; '.join(described[:5])}"
          + (" ..." if len(described) > 5 else ""))
    if not kept:
        raise UserError(f"every {name} sample is longer than --model_max_length {max_length}")
    return kept


def load_images(paths: Sequence[Path], where: Sequence[str]) -> list[Image.Image]:
    from library.tools.image_batches import open_rgb

    images = []
    for path, place in zip(paths, where):
        try:
            images.append(open_rgb(path, background=(255, 255, 255)))
        except (OSError, UnidentifiedImageError) as err:
            raise UserError(f"{place}: cannot read image {path} ({err})") from None
    return images


def collate(family: VLMFamily, items: Sequence[Encoded], pad_id: int, *, padding_side: str = "right",
            images: Sequence[Image.Image] | None = None) -> dict[str, Any]:
    """A padded batch: ``input_ids``, ``attention_mask``, ``labels``, the vision inputs and ``last_index`` (the
    position of each sequence's last real token, which sees the whole prompt and every image)."""
    length = max(len(e) for e in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    last = torch.zeros(len(items), dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e)
        start = length - n if padding_side == "left" else 0
        ids[row, start:start + n] = torch.tensor(e.input_ids)
        labels[row, start:start + n] = torch.tensor(e.labels)
        mask[row, start:start + n] = 1
        last[row] = start + n - 1
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    batch.update(family.extra_inputs(ids))
    paths = [p for e in items for p in e.images]
    if paths:
        if images is None:
            images = load_images(paths, [e.sample.where for e in items for _ in e.images])
        batch.update(family.vision_inputs(images, [len(e.images) for e in items]))
    batch["last_index"] = last
    return batch


MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_sizes", "batch_num_images",
                "image_grid_thw", "mm_token_type_ids")


def model_inputs(batch: dict[str, Any], device: torch.device, dtype: torch.dtype, *,
                 with_labels: bool = True) -> dict[str, Any]:
    """The tensors of a collated batch the model's forward takes, on ``device`` (pixels in ``dtype``)."""
    out = {}
    for key in MODEL_INPUTS:
        if key in batch and (with_labels or key != "labels"):
            value = batch[key].to(device)
            out[key] = value.to(dtype) if key == "pixel_values" else value
    return out
