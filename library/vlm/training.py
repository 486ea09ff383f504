"""``vlm_train.py`` (stage 1) and ``vlm_train_add_head.py`` (stage 2) on the toolkit's training loop.

Order: parse and check every option, read and check the data, tokenize it with the model's tokenizer and
image processor (so too-long samples are reported), check the output folder and ``--resume`` -- all before the
weights load; then load the model, let the recipe choose what trains, and hand a :class:`Run` to the loop.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from library.cli import ArgumentParser
from library.errors import UserError
from library.vlm.adapters import TrainingTargets
from library.vlm.data import DEFAULT_CAPTION_PROMPT, DataOptions, Sample, caption_folder_samples, load_conversations
from library.vlm.encoding import ConversationEncoder, Encoded, collate, encode_all

def add_model_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model_id", type=str, default=None,
                   help="model id from vlm_supported_models.py or a hub id (used only when cached or reachable)")
    g.add_argument("--model_local_path", type=str, default=None, help="local transformers model folder")
    g.add_argument("--model_max_length", type=int, default=1024,
                   help="longest sample in tokens, image tokens included")
    g.add_argument("--drop_too_long", action="store_true",
                   help="leave out samples longer than --model_max_length (default: stop with an error)")
    d = parser.add_argument_group("data")
    d.add_argument("--data_path", type=str, default=None, help="lmms-finetune JSON / JSONL training set")
    d.add_argument("--eval_data_path", type=str, default=None, help="held-out JSON / JSONL set (eval loss)")
    d.add_argument("--image_folder", type=str, default=None, help="folder the image paths are relative to")
    d.add_argument("--user_key", type=str, default="human", help="'from' value of user turns")
    d.add_argument("--assistant_key", type=str, default="gpt", help="'from' value of assistant turns")
    d.add_argument("--caption_folder", type=str, default=None,
                   help="images with .txt captions as 'describe this image' conversations (instead of --data_path)")
    d.add_argument("--eval_caption_folder", type=str, default=None, help="held-out caption folder")
    d.add_argument("--caption_extension", type=str, default=".txt", help="caption file extension")
    d.add_argument("--caption_prompt", type=str, default=DEFAULT_CAPTION_PROMPT,
                   help="the user question of caption-folder samples")
    d.add_argument("--recursive", action="store_true", help="also read caption folders' sub-folders")
    d.add_argument("--train_batch_size", "--per_device_train_batch_size", dest="train_batch_size", type=int,
                   default=1, help="samples per micro-batch and process")


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what trains")
    g.add_argument("--use_lora", action=argparse.BooleanOptionalAction, default=True,
                   help="train a LoRA adapter (--no-use_lora: full fine-tuning of the language model)")
    g.add_argument("--q_lora", action="store_true", help="QLoRA: load the base in 4 bits (needs bitsandbytes)")
    g.add_argument("--lora_r", type=int, default=8, help="LoRA rank")
    g.add_argument("--lora_alpha", type=float, default=16, help="LoRA alpha")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout")
    g.add_argument("--lora_target_modules", type=str, nargs="+", default=None,
                   help="linear layer names in the language model (default: all, e.g. q_proj k_proj v_proj o_proj "
                        "gate_proj up_proj down_proj)")
    g.add_argument("--train_vision_projector", action=argparse.BooleanOptionalAction, default=True,
                   help="train the vision-language projector and save it with the adapter")
    g.add_argument("--train_vision_encoder", action="store_true", help="also train the vision tower")
    g.add_argument("--use_vision_lora", action="store_true", help="LoRA on the vision tower's linear layers")
    g.add_argument("--deepspeed", type=str, default=None,
                   help="DeepSpeed ZeRO config: zero2 or zero3 (shipped in library/vlm/ds_configs) or a JSON file; "
                        "needs deepspeed and CUDA GPUs")


def build_parser(prog: str, description: str, add_recipe_arguments: Callable[[argparse.ArgumentParser], None]
                 ) -> ArgumentParser:
    """Config file, model and data, the recipe's options, optimizer, scheduler and the loop's options."""
    from library.config.arguments import add_config_file_arguments
    from library.training.arguments import add_loop_arguments
    from library.training.optimizers import add_optimizer_arguments
    from library.training.schedulers import add_scheduler_arguments

    parser = ArgumentParser(prog=prog, description=description)
    add_config_file_arguments(parser)
    add_model_and_data_arguments(parser)
    add_recipe_arguments(parser)
    add_optimizer_arguments(parser)
    add_scheduler_arguments(parser)
    add_loop_arguments(parser)
    parser.set_defaults(learning_rate=2e-5, max_train_steps=1000)
    return parser


def targets_from_args(args: argparse.Namespace) -> TrainingTargets:
    return TrainingTargets(use_lora=args.use_lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                           lora_dropout=args.lora_dropout, target_modules=tuple(args.lora_target_modules or ()),
                           train_vision_projector=args.train_vision_projector,
                           train_vision_encoder=args.train_vision_encoder, use_vision_lora=args.use_vision_lora,
                           quantized=args.q_lora)


def stage1_recipe(args: argparse.Namespace) -> Callable[[Any, PreparedData], Any]:
    """``make_recipe(vlm, data)`` of vlm_train.py: the targets applied to the model, wrapped in a VLMRecipe."""
    from library.vlm.adapters import apply_targets
    from library.vlm.recipe import VLMRecipe

    targets = targets_from_args(args)

    def make_recipe(vlm: Any, data: PreparedData) -> VLMRecipe:
        vlm.model = apply_targets(vlm.model, vlm.family, targets, gradient_checkpointing=args.gradient_checkpointing)
        info = {**run_info(args, data, "stage1"), "use_lora": args.use_lora, "q_lora": args.q_lora}
        return VLMRecipe(vlm, use_lora=args.use_lora, info=info)

    return make_recipe


def option_problems(args: argparse.Namespace) -> list[str]:
    from library.training.arguments import loop_option_problems
    from library.training.preparation import uses_cuda

    problems = loop_option_problems(args, cuda=uses_cuda())
    if not args.model_id and not args.model_local_path:
        problems.append("give the base model: --model_local_path FOLDER or --model_id ID (vlm_supported_models.py)")
    if bool(args.data_path) == bool(args.caption_folder):
        problems.append("give the training data: --data_path FILE (lmms-finetune JSON / JSONL) or --caption_folder "
                        "FOLDER (images with captions), one of them")
    if args.eval_data_path and args.eval_caption_folder:
        problems.append("--eval_data_path and --eval_caption_folder: give one held-out set")
    for name in ("train_batch_size", "model_max_length"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1 (got {getattr(args, name)})")
    return problems


@dataclass
class PreparedData:
    train: list[Encoded]
    eval: list[Encoded] | None
    folder: Path
    tokenizer: Any
    image_processor: Any
    family: Any
    text_hidden_size: int


def read_samples(args: argparse.Namespace, *, eval_set: bool) -> list[Sample] | None:
    path = args.eval_data_path if eval_set else args.data_path
    folder = args.eval_caption_folder if eval_set else args.caption_folder
    if path:
        options = DataOptions(Path(args.image_folder) if args.image_folder else None, args.user_key,
                              args.assistant_key)
        return load_conversations(path, options)
    if folder:
        return caption_folder_samples(folder, caption_extension=args.caption_extension, prompt=args.caption_prompt,
                                      recursive=args.recursive)
    return None


def prepare_data(args: argparse.Namespace, *, prompts_only: bool = False) -> PreparedData:
    """Check the data and tokenize it with the base model's tokenizer (no weights are loaded); ``prompts_only``
    leaves the final answers out (stage 2 predicts them with the head)."""
    from transformers import AutoConfig

    from library.vlm.families import family_for
    from library.vlm.loading import load_processing, read_model_type, resolve_model_path

    train_samples = read_samples(args, eval_set=False)
    eval_samples = read_samples(args, eval_set=True)
    flag = "--model_local_path" if args.model_local_path else "--model_id"
    folder = resolve_model_path(args.model_local_path or args.model_id, flag=flag)
    read_model_type(folder, flag)
    tokenizer, image_processor = load_processing(folder)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    family = family_for(config, image_processor)
    encoder = ConversationEncoder(family, tokenizer)
    settings = {"max_length": args.model_max_length, "drop_too_long": args.drop_too_long,
                "for_generation": prompts_only}
    train = encode_all(encoder, train_samples, name="training", **settings)
    held_out = encode_all(encoder, eval_samples, name="held-out", **settings) if eval_samples else None
    return PreparedData(train, held_out, folder, tokenizer, image_processor, family,
                        config.get_text_config().hidden_size)


def load_for_training(folder: Path, args: argparse.Namespace, device: torch.device) -> Any:
    """The base model: in the mixed-precision dtype when its own weights stay frozen (LoRA, the head), in float32
    for full fine-tuning; 4-bit with --q_lora."""
    from library.training.preparation import weight_dtype
    from library.vlm.loading import load_vlm

    full = not getattr(args, "use_lora", True)
    dtype = torch.float32 if full else weight_dtype(args)
    q_lora = getattr(args, "q_lora", False)
    return load_vlm(folder, dtype=dtype, device=device, bits=4 if q_lora else None, flag="--model_local_path")


def make_loaders(data: PreparedData, args: argparse.Namespace, accelerator: Any, seed: int,
                 add: Callable[[list[Encoded]], dict[str, Any]] | None = None) -> tuple[Any, Any]:
    """Training and held-out loaders; ``add(items)`` gives more batch entries (the head's targets)."""
    from library.training.index_loader import IndexEpochLoader

    pad = data.tokenizer.pad_token_id

    def collate_fn(items: list[Encoded]) -> dict[str, Any]:
        batch = collate(data.family, items, pad)
        if add is not None:
            batch.update(add(items))
        return batch

    common = {"process_index": accelerator.process_index, "num_processes": accelerator.num_processes}
    loader = IndexEpochLoader(data.train, collate_fn, batch_size=args.train_batch_size, seed=seed, **common)
    val = None
    if data.eval:
        val = IndexEpochLoader(data.eval, collate_fn, batch_size=args.train_batch_size, seed=seed, shuffle=False,
                               **common)
    return loader, val


def run_info(args: argparse.Namespace, data: PreparedData, stage: str) -> dict[str, Any]:
    return {"stage": stage, "base_model": str(data.folder.resolve()), "family": data.family.name,
            "model_max_length": args.model_max_length}


def world_size() -> int:
    """The number of processes ``accelerate launch`` started (1 for a plain ``python`` run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def train_vlm(args: argparse.Namespace, make_recipe: Callable[[Any, PreparedData], Any], *, extra_problems:
              list[str] | None = None, tracker_name: str = "vlm_train", prompts_only: bool = False,
              check_data: Callable[[PreparedData], None] | None = None,
              add: Callable[[list[Encoded]], dict[str, Any]] | None = None) -> Path:
    """Check, prepare, build the recipe with ``make_recipe(vlm, data)`` and train; returns the final save.
    ``check_data`` runs on the tokenized data before the model loads; ``add`` adds batch entries."""
    from library.training.loop import train
    from library.training.optimizers import create_optimizer, validate_optimizer_args
    from library.training.outputs import OutputNames, check_output_dir, output_problems
    from library.training.preparation import (assemble_run, init_trackers, make_accelerator, shared_seed,
                                              training_length, uses_cuda)
    from library.training.schedulers import create_scheduler, validate_scheduler_args
    from library.training.deepspeed_setup import (deepspeed_plugin, deepspeed_problems,
                                                  single_process_environment)
    from library.training.state import verify_state

    ds_settings, ds_problems = deepspeed_problems(args, cuda=uses_cuda())
    problems = option_problems(args) + ds_problems + list(extra_problems or [])
    for check in (validate_optimizer_args, validate_scheduler_args):
        try:
            check(args)
        except UserError as err:
            problems.append(err.message)
    if problems:
        raise UserError.from_problems("cannot start training", problems)
    names = OutputNames(Path(args.output_dir), args.output_name or "last", "")
    problems = output_problems(args.output_dir, names.name)
    if problems:
        raise UserError.from_problems("cannot start training", problems)
    check_output_dir(names, resume=args.resume, overwrite=args.overwrite)
    resume_info = verify_state(args.resume) if args.resume else None
    data = prepare_data(args, prompts_only=prompts_only)
    if check_data is not None:
        check_data(data)

    plugin = None
    if ds_settings:
        os.environ.update(single_process_environment())  # what a launcher would have set
        plugin = deepspeed_plugin(ds_settings, args, world_size(), data.text_hidden_size)
    accelerator = make_accelerator(args, tracker_name, deepspeed_plugin=plugin)
    seed = shared_seed(args, accelerator, resume_info["seed"] if resume_info else None)
    torch.manual_seed(seed)  # LoRA / head initialisation
    vlm = load_for_training(data.folder, args, accelerator.device)
    recipe = make_recipe(vlm, data)
    loader, val_loader = make_loaders(data, args, accelerator, seed, add)
    steps, epochs = training_length(args, -(-len(loader) // args.gradient_accumulation_steps))
    groups, lr_names = recipe.param_groups(args)
    _, optimizer = create_optimizer(groups, args)
    scheduler = create_scheduler(optimizer, args, steps, accelerator.num_processes)
    if accelerator.is_main_process:
        trained = sum(p.numel() for p in recipe.trainable_parameters())
        total = sum(p.numel() for p in vlm.model.parameters())
        print(f"{data.family.name} from {data.folder}: {len(data.train)} training samples"
              f"{f', {len(data.eval)} held-out' if data.eval else ''}; {steps} steps ({epochs} epochs); trained "
              f"parameters {trained:,} of {total:,}", flush=True)
    run = assemble_run(args, recipe, accelerator, names=names, loader=loader, val_loader=val_loader,
                       optimizer=optimizer, lr_scheduler=scheduler, lr_names=lr_names, seed=seed,
                       max_train_steps=steps, num_epochs=epochs,
                       deepspeed_model=vlm.model if ds_settings else None)
    init_trackers(args, accelerator, tracker_name)
    try:
        return train(run)
    finally:
        accelerator.end_training()
