"""Captions from Qwen2.5-VL for every image of a folder (caption_images_by_qwen_vl.py).

Batched greedy generation with left padding. Without torchvision the transformers processor cannot be built, so
the inputs are assembled here the way it would: chat template, ``<|image_pad|>`` repeated once per merged
vision patch, ``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids``.
"""

from __future__ import annotations

import argparse
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from library.errors import UserError
from library.tools.caption_output import CaptionSink, JsonlSink, SidecarSink, without_blocked
from library.cli import ArgumentParser, non_negative_int
from library.tools.image_batches import (BatchReader, check_positive, default_device, find_images, open_rgb,
                                         pending_images, summary)
from library.tools.qwen_vl_model import QwenVL, load_qwen_vl

DEFAULT_PROMPT = """# Image Annotator
You are a professional image annotator. Please complete the following task based on the input image.
## Create Image Caption
1. Write the caption using natural, descriptive text without structured formats or rich text.
2. Enrich caption details by including: object attributes, vision relations between objects, and environmental details.
3. Identify the text visible in the image, without translation or explanation, and highlight it in the caption with quotation marks.
4. Maintain authenticity and accuracy, avoid generalizations.
"""
IMAGE_FACTOR = 28
MIN_SIZE = 256
IMAGE_TOKEN = "<|image_pad|>"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Caption images with Qwen2.5-VL")
    p.add_argument("--image_dir", required=True, help="folder with the images")
    p.add_argument("--model_path", required=True,
                   help="Qwen2.5-VL .safetensors file (original/ComfyUI layout, or the first shard) or model folder")
    p.add_argument("--processor_path", default=None,
                   help="folder with the tokenizer and image processor files (default: the model's folder)")
    p.add_argument("--output_file", default=None, help="the JSONL file (required with --output_format jsonl)")
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the instruction; a literal \\n is a newline")
    p.add_argument("--max_size", type=int, default=1280, help="images are fitted into max_size x max_size pixels")
    p.add_argument("--fp8_vl", action="store_true", help="store the linear weights in float8 (less memory)")
    p.add_argument("--output_format", choices=["jsonl", "text"], default="jsonl",
                   help="one JSONL file, or a .txt next to each image")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--recursive", action="store_true", help="also caption images in sub-folders")
    p.add_argument("--overwrite", action="store_true", help="caption images that already have a caption again")
    p.add_argument("--max_data_loader_n_workers", type=non_negative_int, default=None,
                   help="threads that read images")
    return p


def bucket_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """Multiples of 28 with an area between 256² and max_size², closest to the image's aspect ratio."""
    f = IMAGE_FACTOR
    min_area, max_area = MIN_SIZE * MIN_SIZE, max_size * max_size
    wr, hr = int(width / f + 0.5) * f, int(height / f + 0.5) * f
    if wr * hr < min_area:
        s = math.sqrt(min_area / (wr * hr)) if wr * hr else math.sqrt(min_area / max(1, width * height))
        nw, nh = math.ceil(width * s / f) * f, math.ceil(height * s / f) * f
        candidates = [(nw, nh), (nw + f, nh), (nw, nh + f)]
    elif wr * hr > max_area:
        s = math.sqrt(max_area / (wr * hr))
        nw, nh = math.floor(width * s / f) * f, math.floor(height * s / f) * f
        candidates = [(nw, nh), (nw - f, nh), (nw, nh - f)]
    else:
        candidates = [(wr, hr), (wr - f, hr), (wr, hr - f), (wr + f, hr), (wr, hr + f)]
    valid = [(w, h) for w, h in candidates if w > 0 and h > 0 and min_area <= w * h <= max_area] or candidates[:1]
    aspect = width / height
    return min(valid, key=lambda wh: abs(wh[0] / wh[1] - aspect))


def resize_to_bucket(image: Image.Image, max_size: int) -> Image.Image:
    """Scale to cover the bucket (Lanczos up, area down) and crop the centre."""
    bw, bh = bucket_size(image.width, image.height, max_size)
    scale = max(bw / image.width, bh / image.height)
    size = (max(bw, round(image.width * scale)), max(bh, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS if scale > 1 else Image.Resampling.BOX)
    left, top = (size[0] - bw) // 2, (size[1] - bh) // 2
    return image.crop((left, top, left + bw, top + bh))


def processor_pixel_limits(max_size: int) -> dict[str, int]:
    """The reference's processor limits (they bound the number of vision tokens)."""
    patch_area = IMAGE_FACTOR * IMAGE_FACTOR
    return {"shortest_edge": MIN_SIZE * patch_area, "longest_edge": max_size * patch_area}


def build_inputs(vl: QwenVL, images: list[Image.Image], prompt: str, max_size: int) -> dict[str, torch.Tensor]:
    """Model inputs for a batch: one user turn with the image then the prompt; prompts padded on the left."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = vl.tokenizer.apply_chat_template(messages, chat_template=vl.chat_template, tokenize=False,
                                            add_generation_prompt=True)
    if text.count(IMAGE_TOKEN) != 1:
        raise UserError(f"the chat template must put exactly one {IMAGE_TOKEN} for an image; it put "
                        f"{text.count(IMAGE_TOKEN)} (check chat_template in the processor folder)")
    size = processor_pixel_limits(max_size)
    if vl.processor is not None:
        return dict(vl.processor(text=[text] * len(images), images=images, size=size, padding=True,
                                 padding_side="left", return_tensors="pt"))
    vision = vl.image_processor(images=images, size=size, return_tensors="pt")
    merge = vl.image_processor.merge_size ** 2
    texts = [text.replace(IMAGE_TOKEN, IMAGE_TOKEN * (int(grid.prod()) // merge)) for grid in vision["image_grid_thw"]]
    tokens = vl.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    image_token_id = vl.model.config.image_token_id
    return {
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
        "mm_token_type_ids": (tokens["input_ids"] == image_token_id).long(),
    }


def stop_token_ids(vl: QwenVL) -> list[int]:
    ids = [vl.model.config.text_config.eos_token_id]
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = vl.tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != vl.tokenizer.unk_token_id:
            ids.append(token_id)
    return sorted({i for i in ids if isinstance(i, int)})


@torch.no_grad()
def caption_batch(vl: QwenVL, images: list[Image.Image], prompt: str, max_size: int, max_new_tokens: int,
                  fp8: bool) -> list[str]:
    from transformers import GenerationConfig

    inputs = build_inputs(vl, images, prompt, max_size)
    inputs = {k: v.to(vl.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(vl.dtype)
    eos = stop_token_ids(vl)
    pad = vl.tokenizer.pad_token_id if vl.tokenizer.pad_token_id is not None else eos[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    use_autocast = fp8 and vl.device.type == "cuda"
    with torch.autocast(vl.device.type, dtype=torch.bfloat16) if use_autocast else nullcontext():
        output = vl.model.generate(**inputs, generation_config=config)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    texts = vl.tokenizer.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return [t.strip() for t in texts]


def _sink(args: argparse.Namespace) -> CaptionSink:
    if args.output_format == "jsonl":
        if not args.output_file:
            raise UserError("--output_format jsonl needs --output_file (or use --output_format text)")
        return JsonlSink(args.output_file, text_key="caption")
    if args.output_file:
        print(f"--output_file {args.output_file} is not used: --output_format text writes a .txt next to each image")
    return SidecarSink(".txt", trailing_newline=False)


def run(args: argparse.Namespace) -> None:
    check_positive("--batch_size", args.batch_size)
    check_positive("--max_new_tokens", args.max_new_tokens)
    if args.max_size < MIN_SIZE:
        raise UserError(f"--max_size must be at least {MIN_SIZE} (got {args.max_size})")
    prompt = args.prompt.replace("\\n", "\n")
    images = find_images(args.image_dir, args.recursive)
    sink = _sink(args)
    images, blocked = without_blocked(images, sink)
    for line in blocked:
        print(f"skipping {line}")
    todo, skipped = pending_images(images, lambda p: sink.existing(p) is not None, args.overwrite)
    reader = BatchReader(lambda p: _load(p, args.max_size), args.batch_size,
                         workers=args.max_data_loader_n_workers or 2)
    written = 0
    try:
        if todo:
            vl = load_qwen_vl(args.model_path, args.processor_path, default_device(), args.fp8_vl)
            with tqdm(total=len(todo), desc="captioning", unit="img") as bar:
                for batch in reader.batches(todo, bar):
                    captions = caption_batch(vl, [item.data for item in batch], prompt, args.max_size,
                                             args.max_new_tokens, args.fp8_vl)
                    for item, caption in zip(batch, captions):
                        sink.write(item.path, caption)
                        written += 1
                    bar.update(len(batch))
    finally:
        sink.close()
    print(summary(written, skipped, reader.failed, "captions", blocked=len(blocked)))


def _load(path: Path, max_size: int) -> tuple[Any, tuple[int, int]]:
    image = open_rgb(path)
    return resize_to_bucket(image, max_size), image.size
