"""Options of the captioner trainers (train_blip_network.py, train_florence_lora.py): the caption-train seed's
flags, the toolkit's loop options (saves, --save_state/--resume, logging, validation) and --config_file."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from library.captioners.families import FLORENCE_TASKS, CaptionerFamily
from library.cli import ArgumentParser
from library.config.arguments import add_config_file_arguments
from library.training.arguments import add_loop_arguments, loop_option_problems

OPTIMIZERS = ("AdamW", "AdamW8bit", "Flora")
INSTALL = {"bitsandbytes": "pip install bitsandbytes==0.50.2", "flora_opt": "pip install flora-opt==0.0.3"}


@dataclass(frozen=True)
class Defaults:
    learning_rate: float
    batch_size: int


def build_captioner_parser(family: CaptionerFamily, *, prog: str, description: str, defaults: Defaults,
                           positional: bool) -> ArgumentParser:
    """``positional``: ``dataset_dir output_dir`` as positional arguments too (the BLIP script's form)."""
    p = ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_file_arguments(p)
    if positional:
        p.add_argument("dataset_dir_arg", nargs="?", metavar="dataset_dir", default=argparse.SUPPRESS,
                       help="dataset folder: metadata.jsonl and images, or image/caption file pairs")
        p.add_argument("output_dir_arg", nargs="?", metavar="output_dir", default=argparse.SUPPRESS,
                       help="save the LoRA (PEFT adapter) to this folder")
    g = p.add_argument_group("captioner")
    g.add_argument("--dataset_dir", default=None, help="dataset folder: metadata.jsonl and images, or image/caption "
                   "file pairs (compiled on the fly)")
    g.add_argument("--caption_extension", default=".txt", help="caption files beside the images (without "
                   "metadata.jsonl)")
    g.add_argument("--val_dataset_dir", default=None, help="held-out dataset folder (default: --val_split of the "
                   "dataset)")
    g.add_argument("--val_split", type=float, default=0.1, help="fraction of the dataset held out for the "
                   "validation loss and the samples (0 = none)")
    g.add_argument("--device", default=None, choices=("cuda", "cpu"), help="cuda or cpu (default: cuda when "
                   "available)")
    g.add_argument("--model_id", default=family.default_model_id, help="local model folder (or Hugging Face id "
                   f"in the local cache) of a transformers {family.model_class}")
    g.add_argument("--rank", type=int, default=16, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=32, help="LoRA alpha")
    g.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    g.add_argument("--rslora", action="store_true", help="rank-stabilised LoRA (alpha / sqrt(rank))")
    g.add_argument("--target_modules", nargs="+", default=list(family.default_targets),
                   help="module names (or dotted suffixes) that get a LoRA. Default: "
                        + " ".join(family.default_targets))
    g.add_argument("--learning_rate", type=float, default=defaults.learning_rate, help="learning rate")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--batch_size", type=int, default=defaults.batch_size, help="image/caption pairs per batch")
    g.add_argument("--epochs", "--max_train_epochs", dest="max_train_epochs", type=int, default=5, help="epochs")
    g.add_argument("--max_train_steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip gradients (0: off)")
    g.add_argument("--name", "--output_name", dest="output_name", default="lora",
                   help="name of intermediate saves and of the log run")
    g.add_argument("--optimizer_name", default="AdamW", choices=OPTIMIZERS,
                   help="AdamW; AdamW8bit needs bitsandbytes; Flora needs flora-opt")
    g.add_argument("--optimizer_rank", type=int, default=None, help="Flora's rank")
    g.add_argument("--scheduler", default=None, choices=("OneCycle",), help="learning-rate schedule (default: "
                   "constant)")
    g.add_argument("--quantize", action="store_true", help="4-bit QLoRA (bitsandbytes NF4; needs a CUDA GPU)")
    g.add_argument("-ac", "--activation_checkpointing", dest="gradient_checkpointing", action="store_true",
                   help="same as --gradient_checkpointing")
    g.add_argument("--accumulation_compression", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--accumulation_rank", "--accumulation-rank", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--sample_every_n_epochs", type=int, default=None, help="caption the held-out sample images "
                   "every N epochs")
    g.add_argument("--sample_every_n_steps", type=int, default=None, help="... every N steps")
    g.add_argument("--sample_count", type=int, default=4, help="held-out images captioned in each sample")
    g.add_argument("--sample_num_beams", type=int, default=3, help="beams for the samples")
    g.add_argument("--sample_max_length", type=int, default=75, help="longest sample caption in tokens")
    g.add_argument("--merge", action="store_true", help="also write the base model with the LoRA merged in, to "
                   "<output_dir>/merged")
    if family.uses_processor:
        g.add_argument("--task", default="<DETAILED_CAPTION>", choices=FLORENCE_TASKS,
                       help="Florence-2 task prompt given to the encoder with each image")
    add_loop_arguments(p)
    p.set_defaults(validate_every_n_epochs=1, validate_at_first=True, log_tracker_name=prog.removesuffix(".py"))
    return p


def resolve_paths(args: argparse.Namespace) -> None:
    """Right after parsing: the positional ``dataset_dir output_dir`` into the options; TensorBoard logs go to
    ``<output_dir>/logs`` unless ``--logging_dir`` says otherwise."""
    for name in ("dataset_dir", "output_dir"):
        positional = getattr(args, f"{name}_arg", None)
        if positional is not None:
            setattr(args, name, positional)
    if args.log_with in ("tensorboard", "all") and args.logging_dir is None and args.output_dir is not None:
        args.logging_dir = os.path.join(args.output_dir, "logs")


def _missing_module(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def captioner_option_problems(args: argparse.Namespace, *, cuda: bool) -> list[str]:
    """Every problem with the options, found before any model loads."""
    problems = loop_option_problems(args, cuda=cuda)
    if args.dataset_dir is None:
        problems.append("the dataset folder is required (dataset_dir / --dataset_dir)")
    elif not os.path.isdir(args.dataset_dir):
        problems.append(f"dataset folder {args.dataset_dir} does not exist")
    if args.val_dataset_dir is not None and not os.path.isdir(args.val_dataset_dir):
        problems.append(f"--val_dataset_dir {args.val_dataset_dir} does not exist")
    for name in ("rank", "batch_size", "max_train_epochs", "sample_count", "sample_num_beams", "sample_max_length",
                 "max_train_steps", "sample_every_n_epochs", "sample_every_n_steps", "optimizer_rank"):
        value = getattr(args, name)
        if value is not None and value < 1:
            problems.append(f"--{name} must be >= 1 (got {value})")
    if not 0 <= args.val_split < 1:
        problems.append(f"--val_split must be in [0, 1) (got {args.val_split})")
    if not 0 <= args.dropout < 1:
        problems.append(f"--dropout must be in [0, 1) (got {args.dropout})")
    if args.device == "cuda" and not cuda:
        problems.append("--device cuda: no CUDA GPU is available (use --device cpu)")
    if args.accumulation_compression or args.accumulation_rank is not None:
        problems.append("--accumulation_compression / --accumulation_rank (Flora's FloraAccelerator) are not "
                        "supported; gradient accumulation is exact here (--gradient_accumulation_steps)")
    needs = {"AdamW8bit": "bitsandbytes", "Flora": "flora_opt"}.get(args.optimizer_name)
    if needs and _missing_module(needs):
        problems.append(f"--optimizer_name {args.optimizer_name} needs the {needs} package: {INSTALL[needs]} "
                        "(or use the default AdamW)")
    if args.optimizer_rank is not None and args.optimizer_name != "Flora":
        problems.append("--optimizer_rank is Flora's option: add --optimizer_name Flora or remove it")
    if args.quantize:
        if _missing_module("bitsandbytes"):
            problems.append(f"--quantize (4-bit QLoRA) needs bitsandbytes: {INSTALL['bitsandbytes']}")
        if not cuda:
            problems.append("--quantize (4-bit QLoRA) needs a CUDA GPU; on the CPU train without --quantize")
    return problems
