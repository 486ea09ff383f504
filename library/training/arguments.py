"""Command-line options of the training loop (outputs, steps, precision, saving/resume, caching, logging,
validation) shared by train_network.py, train_db.py and fine_tune.py; :func:`add_loop_arguments` is the part
every recipe's script has (the captioner trainers take only that part).

The other areas add their own groups first (models: ``--clip_skip``, ``--max_token_length``, ``--lowram``;
dataset: ``--max_data_loader_n_workers``; optimizer: ``--max_grad_norm``; network: ``--no_metadata``,
``--scale_weight_norms`` ...). :func:`add_training_arguments` then adds the loop's options; the few that a
script may already have from another group (``--save_precision``, ``--metadata_*``, ``--training_comment``)
are added only when missing, so an option lives in exactly one place.
"""

from __future__ import annotations

import argparse
from typing import Any

from library.training.compile import DYNAMO_BACKENDS, compile_problems

MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
LOG_WITH_CHOICES = ("tensorboard", "wandb", "all")


def _add(group: argparse._ArgumentGroup, parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> None:
    if any(flag in parser._option_string_actions for flag in flags):
        return
    group.add_argument(*flags, **kwargs)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the loop's options (sd-scripts names and defaults) that no other group has added yet: those of
    :func:`add_loop_arguments`, then the diffusion models' own."""
    add_loop_arguments(parser)
    g = parser.add_argument_group("training")

    def add(*flags: str, **kwargs: Any) -> None:
        _add(g, parser, *flags, **kwargs)

    add("--training_comment", type=str, default=None, help="free text stored as ss_training_comment")
    for key in ("title", "author", "description", "license", "tags"):
        add(f"--metadata_{key}", type=str, default=None, help=f"modelspec.{key} of the saved file")
    add("--full_fp16", action="store_true", help="train the weights themselves in fp16")
    add("--full_bf16", action="store_true", help="train the weights themselves in bf16")
    add("--no_half_vae", action="store_true", help="keep the VAE in float32 under mixed precision")
    add("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    add("--xformers", action="store_true", help="use xformers memory-efficient attention")
    add("--mem_eff_attn", action="store_true", help="memory-efficient attention (SDPA here)")
    add("--torch_compile", action="store_true",
        help="compile the denoiser with torch.compile (the first steps pay the compile time)")
    add("--dynamo_backend", type=str, default="inductor", choices=DYNAMO_BACKENDS,
        help="torch.compile backend with --torch_compile (default inductor)")
    add("--cache_latents", action="store_true", help="encode every image once before training")
    add("--cache_latents_to_disk", action="store_true", help="also keep the latents in .npz files beside images")
    add("--vae_batch_size", type=int, default=1, help="batch size when encoding latents")
    add("--cache_text_encoder_outputs", action="store_true",
        help="encode every caption once (frozen text encoder, fixed captions only)")
    add("--cache_text_encoder_outputs_to_disk", action="store_true",
        help="also keep text encoder outputs on disk (keyed by caption and encoder)")
    add("--weighted_captions", action="store_true", help="A1111 (word:1.2) weights in captions")


def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every recipe's run has (outputs, saving, resume, length, precision, logging, validation);
    a script whose recipe is not a diffusion model adds only these, beside its own."""
    g = parser.add_argument_group("training loop")

    def add(*flags: str, **kwargs: Any) -> None:
        _add(g, parser, *flags, **kwargs)

    # outputs
    add("--output_dir", type=str, default=None, help="folder for the trained weights, states and samples")
    add("--output_name", type=str, default=None, help="base name of saved files (default: last)")
    add("--overwrite", action="store_true",
        help="allow replacing files of an earlier run with the same output_name in output_dir")
    add("--save_every_n_epochs", type=int, default=None, help="save weights every N epochs")
    add("--save_every_n_steps", type=int, default=None, help="save weights every N steps")
    add("--save_n_epoch_ratio", type=int, default=None,
        help="save at least this many epoch files in all (sets the epoch interval from the epoch count)")
    add("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch files")
    add("--save_last_n_steps", type=int, default=None, help="keep only step files of the last N steps")
    add("--save_last_n_epochs_state", type=int, default=None, help="keep only the last N epoch states")
    add("--save_last_n_steps_state", type=int, default=None, help="keep only states of the last N steps")
    add("--save_precision", type=str, default=None, choices=(None, "float", "fp16", "bf16"),
        help="dtype of saved weights (default: the training dtype)")
    add("--save_state", action="store_true", help="also save the resumable training state with each save")
    add("--save_state_on_train_end", action="store_true", help="save the training state at the end")
    add("--resume", type=str, default=None, help="state folder to resume from")

    # length
    add("--max_train_steps", type=int, default=1600, help="number of optimizer steps")
    add("--max_train_epochs", type=int, default=None, help="number of epochs (overrides --max_train_steps)")
    add("--seed", type=int, default=None, help="random seed (default: a random one, recorded in metadata)")

    # precision and memory
    add("--mixed_precision", type=str, default="no", choices=MIXED_PRECISION_CHOICES, help="autocast dtype")
    add("--gradient_checkpointing", action="store_true", help="trade compute for memory")
    add("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    add("--ddp_timeout", type=int, default=None, help="process-group timeout in minutes")

    # logging
    add("--logging_dir", type=str, default=None, help="TensorBoard/wandb log folder (enables logging)")
    add("--log_with", type=str, default=None, choices=LOG_WITH_CHOICES, help="tracker(s)")
    add("--log_prefix", type=str, default=None, help="prefix of the run folder in logging_dir")
    add("--log_tracker_name", type=str, default=None, help="tracker project name (default network_train)")
    add("--wandb_run_name", type=str, default=None, help="wandb run name")
    add("--log_config", action="store_true", help="log the (path-free) run options to the tracker")

    # validation
    add("--validate_every_n_steps", type=int, default=None, help="validation loss every N steps")
    add("--validate_every_n_epochs", type=int, default=None, help="validation loss every N epochs")
    add("--max_validation_steps", type=int, default=None, help="validation batches per evaluation (max)")
    add("--validate_at_first", action="store_true", help="also compute the validation loss before the first step")


def training_option_problems(args: argparse.Namespace, *, cuda: bool) -> list[str]:
    """Every problem with the options of :func:`add_training_arguments` (checked together, before any model
    loads)."""
    problems = loop_option_problems(args, cuda=cuda)
    if args.full_fp16 and args.mixed_precision != "fp16":
        problems.append("--full_fp16 requires --mixed_precision fp16")
    if args.full_bf16 and args.mixed_precision != "bf16":
        problems.append("--full_bf16 requires --mixed_precision bf16")
    if args.full_fp16 and args.full_bf16:
        problems.append("--full_fp16 and --full_bf16 exclude each other")
    if args.xformers:
        try:
            import xformers  # noqa: F401
        except ImportError:
            problems.append("--xformers was given but the xformers package is not installed: install it, or "
                            "drop the flag (PyTorch SDPA attention is used by default and is as fast)")
    problems += compile_problems(args, cuda=cuda)
    if args.vae_batch_size is not None and args.vae_batch_size < 1:
        problems.append(f"--vae_batch_size must be >= 1 (got {args.vae_batch_size})")
    return problems


def loop_option_problems(args: argparse.Namespace, *, cuda: bool) -> list[str]:
    """Every problem with the options of :func:`add_loop_arguments`."""
    problems: list[str] = []
    if args.output_dir is None:
        problems.append("--output_dir is required: the folder where the trained weights are written")
    if args.max_train_epochs is not None and args.max_train_epochs < 1:
        problems.append(f"--max_train_epochs must be >= 1 (got {args.max_train_epochs})")
    if args.max_train_epochs is None and (args.max_train_steps is None or args.max_train_steps < 1):
        problems.append(f"--max_train_steps must be >= 1 (got {args.max_train_steps})")
    if args.gradient_accumulation_steps < 1:
        problems.append(f"--gradient_accumulation_steps must be >= 1 (got {args.gradient_accumulation_steps})")
    if args.mixed_precision == "fp16" and not cuda:
        problems.append("--mixed_precision fp16 needs a CUDA GPU (fp16 kernels are missing on CPU): "
                        "use --mixed_precision bf16 or no")
    if args.log_with in ("wandb", "all"):
        try:
            import wandb  # noqa: F401
        except ImportError:
            problems.append(f"--log_with {args.log_with} needs the wandb package: pip install wandb (or log with "
                            "tensorboard)")
    if args.log_with is not None and args.logging_dir is None and args.log_with != "wandb":
        problems.append(f"--log_with {args.log_with} needs --logging_dir (the folder for the logs)")
    for name in ("save_every_n_epochs", "save_every_n_steps", "save_n_epoch_ratio", "save_last_n_epochs",
                 "save_last_n_steps", "validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            problems.append(f"--{name} must be >= 1 (got {value})")
    if getattr(args, "resume", None) and getattr(args, "overwrite", False):
        problems.append("--resume and --overwrite exclude each other: a resumed run continues its own files")
    return problems
