"""Train a captioner LoRA on the toolkit's loop: checks, data, model, optimizer, then ``loop.train``."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.captioners.arguments import captioner_option_problems
from library.captioners.data import CaptionPair, load_pairs, split_held_out
from library.captioners.families import Captioner, CaptionerFamily, check_model_family, load_captioner
from library.captioners.recipe import (AdapterOutputNames, CaptionerLoRARecipe, LoraSettings, SampleSettings,
                                       open_image)
from library.errors import UserError
from library.training.outputs import check_output_dir, output_problems


@dataclass
class Sample:
    image: Path
    token_ids: list[int]


@dataclass
class CaptionData:
    train: list[CaptionPair]
    held_out: list[CaptionPair]


def check_before_loading(args: argparse.Namespace, family: CaptionerFamily,
                         cuda: bool) -> tuple[CaptionData, AdapterOutputNames, Any]:
    """Options, dataset, images and output folder, all before the model loads."""
    from library.training.state import verify_state

    problems = captioner_option_problems(args, cuda=cuda)
    if problems:
        raise UserError.from_problems("cannot start training", problems)
    pairs = load_pairs(args.dataset_dir, args.caption_extension)
    if args.val_dataset_dir:
        data = CaptionData(pairs, load_pairs(args.val_dataset_dir, args.caption_extension))
    else:
        data = CaptionData(*split_held_out(pairs, args.val_split))
    _check_images([p.image for p in data.train + data.held_out])
    check_model_family(args.model_id, family)
    names = AdapterOutputNames(Path(args.output_dir), args.output_name, "")
    problems = output_problems(args.output_dir, names.name)
    if problems:
        raise UserError.from_problems("cannot start training", problems)
    resume_info = verify_state(args.resume) if args.resume else None
    check_output_dir(names, resume=args.resume, overwrite=args.overwrite)
    return data, names, resume_info


def _check_images(paths: list[Path]) -> None:
    from PIL import Image

    bad = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.size
        except (OSError, ValueError, SyntaxError) as err:
            bad.append(f"{path}: {type(err).__name__}: {err}")
    if bad:
        raise UserError.from_problems("these dataset images cannot be read; fix or remove them", bad)


def tokenize(captioner: Captioner, pairs: list[CaptionPair]) -> list[Sample]:
    """Each caption's token ids, once; a caption longer than the model's positions is an error naming it."""
    ids = captioner.tokenize_captions([p.text for p in pairs])
    config = captioner.model.config.text_config
    limit = getattr(config, "max_position_embeddings", None)
    long = [f"{p.image} ({len(t)} tokens)" for p, t in zip(pairs, ids) if limit and len(t) > limit]
    if long:
        raise UserError.from_problems(f"captions longer than the model's {limit} text positions; shorten them",
                                      long)
    return [Sample(p.image, t) for p, t in zip(pairs, ids)]


def make_collate(captioner: Captioner) -> Any:
    def collate(samples: list[Sample]) -> dict[str, torch.Tensor]:
        images = [open_image(s.image) for s in samples]
        return captioner.training_inputs(images, [s.token_ids for s in samples])

    return collate


def make_optimizer(args: argparse.Namespace, params: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """``--optimizer_name`` over the recipe's parameter groups (the optional packages imported only here)."""
    if args.optimizer_name == "AdamW8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    if args.optimizer_name == "Flora":
        from flora_opt import Flora

        return Flora(params, lr=args.learning_rate, rank=args.optimizer_rank, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)


def make_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps: int) -> Any:
    if args.scheduler == "OneCycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.learning_rate, total_steps=steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _quantization(args: argparse.Namespace) -> Any:
    if not args.quantize:
        return None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def train_captioner(args: argparse.Namespace, family: CaptionerFamily) -> Path | None:
    """Train; returns the adapter folder (the output folder)."""
    from library.training.loop import train
    from library.training.preparation import init_trackers, make_accelerator, shared_seed, uses_cuda
    from library.training.state import check_process_count

    data, names, resume_info = check_before_loading(args, family, uses_cuda())
    accelerator = make_accelerator(args, args.log_tracker_name)
    if resume_info is not None:
        check_process_count(args.resume, resume_info["num_processes"], accelerator.num_processes)
    seed = shared_seed(args, accelerator, resume_info["seed"] if resume_info else None)
    torch.manual_seed(seed)  # the LoRA's initial weights
    device = accelerator.device
    captioner = load_captioner(family, args.model_id, task=getattr(args, "task", ""), quantization=_quantization(args),
                               device_map={"": device} if args.quantize else None)
    recipe = CaptionerLoRARecipe(captioner, LoraSettings(args.rank, args.alpha, args.dropout,
                                                         tuple(args.target_modules), args.rslora),
                                 SampleSettings(args.sample_num_beams, args.sample_max_length))
    recipe.setup(gradient_checkpointing=args.gradient_checkpointing, quantized=args.quantize)
    if not args.quantize:
        recipe.model.to(device)
    run = _assemble(args, accelerator, recipe, captioner, data, names, seed)
    init_trackers(args, accelerator, args.log_tracker_name)
    try:
        final = train(run)
    finally:
        accelerator.end_training()
    if args.merge and accelerator.is_main_process:
        from library.captioners.peft_io import merge_adapter

        merged = merge_adapter(family, args.model_id, final, final / "merged")
        print(f"merged model written to {merged}", flush=True)
    return final


def _assemble(args: argparse.Namespace, accelerator: Any, recipe: CaptionerLoRARecipe, captioner: Captioner,
              data: CaptionData, names: AdapterOutputNames, seed: int) -> Any:
    from library.training.index_loader import IndexEpochLoader
    from library.training.preparation import assemble_run

    collate = make_collate(captioner)
    loader = IndexEpochLoader(tokenize(captioner, data.train), collate, batch_size=args.batch_size, seed=seed,
                              process_index=accelerator.process_index, num_processes=accelerator.num_processes)
    held = tokenize(captioner, data.held_out)
    val_batches = [collate(held[i:i + args.batch_size]) for i in range(0, len(held), args.batch_size)]
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.max_train_epochs * steps_per_epoch
    groups, lr_names = recipe.param_groups(args)
    optimizer = make_optimizer(args, groups)
    if accelerator.is_main_process:
        print(f"{len(data.train)} training pairs, {len(data.held_out)} held out; {steps_per_epoch} steps per epoch, "
              f"{max_steps} steps; trained parameters: {sum(p.numel() for p in recipe.trainable_parameters()):,}",
              flush=True)
    return assemble_run(args, recipe, accelerator, names=names, loader=loader, val_loader=val_batches,
                        optimizer=optimizer, lr_scheduler=make_scheduler(args, optimizer, max_steps),
                        lr_names=lr_names, seed=seed, max_train_steps=max_steps,
                        num_epochs=math.ceil(max_steps / steps_per_epoch),
                        sample_prompts=(data.held_out or data.train)[:args.sample_count])


def run_captioner_script(args: argparse.Namespace, family: CaptionerFamily) -> Path | None:
    """The trainers' ``main`` after parsing: positional paths, ``--device``, then :func:`train_captioner`."""
    import os

    from library.captioners.arguments import resolve_paths

    resolve_paths(args)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # read by make_accelerator / uses_cuda
    return train_captioner(args, family)
