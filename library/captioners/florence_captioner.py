"""Caption a folder with Florence-2 (``finetune/make_captions_by_florence2.py``), optionally with a LoRA from
``train_florence_lora.py``: captions beside the images, existing ones kept unless ``--overwrite``, unreadable
images skipped and named, nothing downloaded unless the model is named by a hub id and the hub is reachable.

The seed's ``inference_florence.py`` / ``inference.py`` flags are accepted: ``--base_model`` (= ``--model_id``),
``--images`` (= the folder argument), ``--beams`` (= ``--num_beams``), ``--max_token_length``
(= ``--max_length``); ``--save_captions`` is the default behaviour here.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from tqdm import tqdm

from library.captioners.families import FLORENCE2, FLORENCE_TASKS, load_captioner
from library.cli import ArgumentParser
from library.errors import UserError
from library.tools.caption_output import SidecarSink
from library.tools.image_batches import (BatchReader, check_positive, default_device, find_images, open_rgb,
                                         pending_images, summary)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="make_captions_by_florence2.py", description="Caption images with Florence-2 "
                       "(Florence2ForConditionalGeneration), optionally with a PEFT LoRA")
    p.add_argument("train_data_dir", nargs="?", default=None, help="folder with the images")
    p.add_argument("--images", dest="images", default=None, help="same as the folder argument (seed name)")
    p.add_argument("--model_id", "--base_model", dest="model_id", default=FLORENCE2.default_model_id,
                   help="local folder (or Hugging Face id) of a native transformers Florence-2 model")
    p.add_argument("--peft_model", default=None, help="PEFT LoRA folder from train_florence_lora.py")
    p.add_argument("--task", default="<DETAILED_CAPTION>", choices=FLORENCE_TASKS,
                   help="task prompt (use the one the LoRA was trained with)")
    p.add_argument("--num_beams", "--beams", dest="num_beams", type=int, default=3, help="beam search width")
    p.add_argument("--max_length", "--max_token_length", dest="max_length", type=int, default=75,
                   help="longest caption in new tokens")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--caption_extension", default=".txt")
    p.add_argument("--overwrite", action="store_true", help="replace existing caption files")
    p.add_argument("--save_captions", action="store_true", help="accepted for the seed's scripts (captions are "
                   "always written)")
    p.add_argument("--recursive", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_data_loader_n_workers", type=int, default=None, help="threads that read images")
    p.add_argument("--debug", action="store_true", help="print every caption")
    return p


def _folder(args: argparse.Namespace) -> str:
    if args.train_data_dir and args.images and args.train_data_dir != args.images:
        raise UserError(f"two image folders given ({args.train_data_dir} and --images {args.images}); give one")
    folder = args.train_data_dir or args.images
    if folder is None:
        raise UserError("give the image folder (make_captions_by_florence2.py FOLDER, or --images FOLDER)")
    return folder


def run(args: argparse.Namespace) -> None:
    for name in ("batch_size", "num_beams", "max_length"):
        check_positive(f"--{name}", getattr(args, name))
    images = find_images(_folder(args), args.recursive)
    if args.peft_model:
        from library.captioners.peft_io import check_adapter_folder

        check_adapter_folder(args.peft_model)
    sink = SidecarSink(args.caption_extension)
    todo, skipped = pending_images(images, lambda p: sink.existing(p) is not None, args.overwrite)
    reader: BatchReader[Any] = BatchReader(lambda p: (lambda im: (im, im.size))(open_rgb(p)), args.batch_size,
                                           workers=args.max_data_loader_n_workers or 2)
    written = 0
    if todo:
        torch.manual_seed(args.seed)
        captioner = load_captioner(FLORENCE2, args.model_id, task=args.task)
        if args.peft_model:
            from library.captioners.peft_io import apply_adapter

            captioner.model = apply_adapter(captioner.model, args.peft_model, merge=True)
        captioner.model.to(default_device()).eval()
        with tqdm(total=len(todo), desc="captioning", unit="img") as bar:
            for batch in reader.batches(todo, bar):
                texts = captioner.caption([item.data for item in batch], num_beams=args.num_beams,
                                          max_length=args.max_length)
                for item, text in zip(batch, texts):
                    sink.write(item.path, text)
                    written += 1
                    if args.debug:
                        tqdm.write(f"{item.path}: {text}")
                bar.update(len(batch))
    print(summary(written, skipped, reader.failed, "captions"))
