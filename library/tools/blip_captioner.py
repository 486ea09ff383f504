"""BLIP captions (finetune/make_captions.py) through transformers' BlipForConditionalGeneration.

Generation follows sd-scripts: the prompt "a picture of " is given to the decoder and removed from the result;
nucleus sampling (top_p, repetition penalty 1.1) by default, beam search (repetition penalty 1.0) with
--beam_search. The global seed makes sampling repeatable for a given batch size.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from library.errors import UserError
from library.tools.caption_output import SidecarSink, without_blocked
from library.cli import ArgumentParser, non_negative_int
from library.tools.hub_files import hub_offline
from library.tools.image_batches import (BatchReader, check_positive, default_device, find_images, open_rgb,
                                         pending_images, summary)

DEFAULT_MODEL_ID = "Salesforce/blip-image-captioning-large"
PROMPT = "a picture of "


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Caption images with BLIP")
    p.add_argument("train_data_dir", help="folder with the images")
    p.add_argument("--caption_weights", default=None,
                   help="folder of a transformers BLIP captioning model (takes precedence over --model_id)")
    p.add_argument("--model_id", default=DEFAULT_MODEL_ID,
                   help="local folder or Hugging Face id of a transformers BLIP captioning model")
    p.add_argument("--peft_model", default=None,
                   help="PEFT LoRA folder from train_blip_network.py, applied to the model (captions then start as "
                        "trained, without the \"a picture of\" prompt)")
    p.add_argument("--caption_extension", default=".caption")
    p.add_argument("--caption_extention", default=None, help=argparse.SUPPRESS)
    p.add_argument("--beam_search", action="store_true", help="beam search instead of nucleus sampling")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--max_data_loader_n_workers", type=non_negative_int, default=None, help="threads that read images")
    p.add_argument("--num_beams", type=int, default=1, help="beams with --beam_search")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling threshold")
    p.add_argument("--max_length", type=int, default=75, help="longest caption in tokens (prompt included)")
    p.add_argument("--min_length", type=int, default=5, help="shortest caption in tokens (prompt included)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--debug", action="store_true", help="print every caption")
    p.add_argument("--recursive", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace existing caption files")
    return p


def model_source(args: argparse.Namespace) -> str:
    """The folder or hub id to load, with a clear error for what cannot work."""
    if args.caption_weights:
        path = Path(args.caption_weights)
        if path.is_dir():
            return str(path)
        raise UserError(f"--caption_weights {args.caption_weights}: give the folder of a transformers BLIP "
                        "captioning model (config.json, model.safetensors, tokenizer and preprocessor files); the "
                        f"original Salesforce .pth checkpoints are not supported (use --model_id {DEFAULT_MODEL_ID})")
    return args.model_id


def _from_pretrained(cls: Any, source: str, **kwargs: Any) -> Any:
    """Local folder or local cache first; the hub only when it is reachable; never a silent fallback."""
    from safetensors import SafetensorError

    if Path(source).is_dir():
        try:
            return cls.from_pretrained(source, local_files_only=True, **kwargs)
        except (OSError, ValueError, SafetensorError) as err:  # missing or unusable files of a local folder
            raise UserError(f"{source}: not a complete transformers BLIP captioning model folder (it needs "
                            "config.json, model.safetensors, the tokenizer files and preprocessor_config.json): "
                            f"{' '.join(str(err).split())[:400]}") from err
    if Path(source).exists() or source.count("/") != 1:
        raise UserError(f"--model_id {source}: neither a model folder nor a Hugging Face id (owner/name)")
    try:
        return cls.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError:
        pass
    if hub_offline():
        raise UserError(f"{source} is not in the local Hugging Face cache and the hub is disabled "
                        "(HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); download it or pass a local folder with --model_id")
    try:
        return cls.from_pretrained(source, **kwargs)
    except OSError as err:
        raise UserError(f"could not load {source} from the Hugging Face Hub ({err}); pass a local model folder "
                        "with --model_id") from err


def load_blip(source: str, device: torch.device) -> tuple[Any, Any, Any]:
    from transformers import AutoImageProcessor, AutoTokenizer, BlipForConditionalGeneration

    tokenizer = _from_pretrained(AutoTokenizer, source)
    image_processor = _from_pretrained(AutoImageProcessor, source)
    model = _from_pretrained(BlipForConditionalGeneration, source)
    return model.to(device).eval(), tokenizer, image_processor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def caption_batch(model: Any, tokenizer: Any, pixel_values: torch.Tensor, args: argparse.Namespace,
                  prompt_text: str = PROMPT) -> list[str]:
    device = next(model.parameters()).device
    prompt = tokenizer([prompt_text] * len(pixel_values), return_tensors="pt").input_ids.to(device)
    if args.beam_search:
        options = dict(num_beams=args.num_beams, repetition_penalty=1.0)
    else:
        options = dict(do_sample=True, top_p=args.top_p, repetition_penalty=1.1)
    output = model.generate(pixel_values=pixel_values.to(device, model.dtype), input_ids=prompt,
                            max_length=args.max_length, min_length=args.min_length, **options)
    new_tokens = output[:, prompt.shape[1] - 1:]  # generate drops the prompt's trailing [SEP]
    return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def run(args: argparse.Namespace) -> None:
    for name in ("batch_size", "num_beams", "max_length"):
        check_positive(f"--{name}", getattr(args, name))
    if args.min_length > args.max_length:
        raise UserError(f"--min_length {args.min_length} is longer than --max_length {args.max_length}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1] (got {args.top_p})")
    if args.num_beams > 1 and not args.beam_search:
        print(f"--num_beams {args.num_beams} is not used: captions are sampled (top_p {args.top_p}); add "
              "--beam_search to use beams")
    source = model_source(args)
    if args.peft_model:
        from library.captioners.peft_io import check_adapter_folder

        check_adapter_folder(args.peft_model)
    images = find_images(args.train_data_dir, args.recursive)
    sink = SidecarSink(args.caption_extention or args.caption_extension)
    images, blocked = without_blocked(images, sink)
    for line in blocked:
        print(f"skipping {line}")
    todo, skipped = pending_images(images, lambda p: sink.existing(p) is not None, args.overwrite)
    written = 0
    reader: BatchReader = BatchReader(open_rgb_sized, args.batch_size, workers=args.max_data_loader_n_workers or 2)
    if todo:
        seed_everything(args.seed)
        model, tokenizer, image_processor = load_blip(source, default_device())
        prompt = PROMPT
        if args.peft_model:
            from library.captioners.peft_io import apply_adapter

            model, prompt = apply_adapter(model, args.peft_model, merge=True).eval(), ""
        with tqdm(total=len(todo), desc="captioning", unit="img") as bar:
            for batch in reader.batches(todo, bar):
                pixels = image_processor(images=[item.data for item in batch], return_tensors="pt")["pixel_values"]
                for item, caption in zip(batch, caption_batch(model, tokenizer, pixels, args, prompt)):
                    sink.write(item.path, caption)
                    written += 1
                    if args.debug:
                        tqdm.write(f"{item.path}: {caption}")
                bar.update(len(batch))
    print(summary(written, skipped, reader.failed, "captions", blocked=len(blocked)))


def open_rgb_sized(path: Path) -> tuple[Any, tuple[int, int]]:
    image = open_rgb(path)
    return image, image.size
