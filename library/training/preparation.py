"""Everything before the first step: checks (all before any model loads), the accelerator, the dataset and
its plan, models, the recipe's trained modules, caches, optimizer, scheduler, and the resumed state."""

from __future__ import annotations

import argparse
import math
import os
import random
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from library.config.dataset_config import resolve_dataset_params
from library.config.params import DatasetGroupParams, DatasetSupport
from library.errors import UserError
from library.models.families import ModelFamily, resolve_family
from library.models.loading import resolve_model_path
from library.models.weights import module_bytes, move_module, release_host_memory
from library.precision import dtype_of
from library.training.arguments import training_option_problems
from library.training.logging_utils import tracker_settings
from library.training.outputs import OutputNames, check_output_dir, output_problems
from library.training.recipes import LoopRecipe, Recipe
from library.training.state import PROGRESS, verify_state
from library.training.text_cache import caption_variation_reasons


@dataclass
class Checked:
    """Results of the checks that run before the accelerator and any model exist."""

    params: DatasetGroupParams
    names: OutputNames
    family: ModelFamily
    cache_text: bool
    sample_prompts: list[Any] = field(default_factory=list)
    resume_info: dict[str, Any] | None = None  # the validated train_state.json of --resume


def uses_cuda() -> bool:
    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.cuda.is_available() and not forced_cpu


def check_run(args: argparse.Namespace, recipe: Recipe, support: DatasetSupport,
              families: Sequence[str] = ("sd",)) -> Checked:
    """Validate every option and the dataset configuration, and resolve the model family (one of the specs
    named in ``families``) from the checkpoint and the flags; one UserError for all problems found."""
    from library.training.losses import validate_noise_loss_args
    from library.training.optimizers import validate_optimizer_args
    from library.training.sampling import validate_sampling_args, warn_unread_prompt_keys
    from library.training.schedulers import validate_scheduler_args

    problems: list[str] = []

    def collect(check: Any) -> Any:
        try:
            return check()
        except UserError as err:
            problems.extend(err.items())
            return None

    problems += training_option_problems(args, cuda=uses_cuda())
    collect(lambda: validate_noise_loss_args(args))
    collect(lambda: validate_optimizer_args(args))
    collect(lambda: validate_scheduler_args(args))
    source = collect(lambda: resolve_model_path(args.pretrained_model_name_or_path))
    family = collect(lambda: resolve_family(args, families, source)) if source is not None else None
    params = collect(lambda: resolve_dataset_params(args, support))
    sample_prompts = collect(lambda: validate_sampling_args(args)) or []
    problems += recipe.option_problems(args)
    if family is not None:
        problems += recipe.family_problems(family)
        warn_unread_prompt_keys(sample_prompts, family.spec.sample_prompt_keys, family.name)
    if params is None:
        raise UserError.from_problems("cannot start training", problems)
    problems += recipe.dataset_problems(params)
    if family is not None:
        problems += family.spec.dataset_problems(family, args, params)

    if args.cache_latents or args.cache_latents_to_disk:
        for ds in params.datasets:
            for sub in ds.subsets:
                bad = [n for n, on in (("random_crop", sub.random_crop), ("color_aug", sub.color_aug),
                                       ("face_crop_aug_range", sub.face_crop_aug_range)) if on]
                if bad:
                    problems.append(f"--cache_latents: {sub.origin} has {', '.join(bad)}, which change the image "
                                    "every step, so latents cannot be computed once; remove one or the other")

    if getattr(args, "masked_loss", False) and not any(sub.alpha_mask for ds in params.datasets
                                                         for sub in ds.subsets):
        problems.append("--masked_loss: no subset has masks, so the loss would not be masked; set alpha_mask = true "
                        "on the subsets whose images have a transparency mask (or --alpha_mask), or remove "
                        "--masked_loss")

    variation = caption_variation_reasons(params)
    want_text_cache = args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk
    if want_text_cache:  # a text encoder that trains is each recipe's own problem (its fix differs)
        for reason in variation:
            problems.append(f"--cache_text_encoder_outputs: captions change every step ({reason}); remove the "
                            "option or the caption randomization")
    cache_text = want_text_cache or (not recipe.trains_text_encoder() and not variation)

    output_name = args.output_name or "last"
    names = OutputNames(Path(args.output_dir or "."), output_name, recipe.file_extension)
    problems += output_problems(args.output_dir, output_name)
    resume_info = collect(lambda: verify_state(args.resume)) if args.resume else None
    if resume_info is not None and resume_info.get("recipe", recipe.name) != recipe.name:
        problems.append(resume_recipe_problem(args.resume, resume_info["recipe"], recipe.name))
    if problems or family is None:
        raise UserError.from_problems("cannot start training", problems)
    if args.output_dir is not None:
        check_output_dir(names, resume=args.resume, overwrite=args.overwrite)
    return Checked(params=params, names=names, family=family, cache_text=cache_text, sample_prompts=sample_prompts,
                   resume_info=resume_info)


def resume_recipe_problem(folder: str, saved: str, current: str) -> str:
    """A state of another kind of training (a LoRA state given to train_db.py, ...)."""
    scripts = {"lora": "train_network.py", "dreambooth": "train_db.py", "fine_tuning": "fine_tune.py",
               "textual_inversion": "train_textual_inversion.py",
               "textual_inversion_xti": "train_textual_inversion_XTI.py"}
    script = scripts.get(saved)
    hint = f"resume it with {script}" if script else "resume it with the script that saved it"
    return (f"--resume {folder}: this is a state of a {saved} training ({PROGRESS} field 'recipe'), but this run "
            f"is a {current} training; {hint}, or give a state of this script")


def make_accelerator(args: argparse.Namespace, tracker_name: str, *, deepspeed_plugin: Any = None) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        # accelerate keeps its state process-wide; a second run in the same process (demo, tests, notebooks)
        # may use other settings, which accelerate refuses unless the old state is dropped first
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    trackers, project_dir = tracker_settings(args, tracker_name)
    handlers = [InitProcessGroupKwargs(timeout=timedelta(minutes=args.ddp_timeout))] if args.ddp_timeout else []
    return Accelerator(mixed_precision=args.mixed_precision, log_with=trackers, project_dir=project_dir,
                       kwargs_handlers=handlers, cpu=not uses_cuda(), deepspeed_plugin=deepspeed_plugin)


def shared_seed(args: argparse.Namespace, accelerator: Any, resume_seed: int | None = None) -> int:
    """``--seed``; else the resumed run's seed (data order and noise continue as they were); else one random
    seed chosen by the main process and shared with the others."""
    if args.seed is not None:
        if resume_seed is not None and resume_seed != args.seed and accelerator.is_main_process:
            print(f"warning: the resumed run used --seed {resume_seed}; with --seed {args.seed} the data order and "
                  "noise differ from an uninterrupted run", flush=True)
        return int(args.seed)
    if resume_seed is not None:
        return int(resume_seed)
    from accelerate.utils import broadcast_object_list

    chosen = [random.SystemRandom().randrange(2**31) if accelerator.is_main_process else 0]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    return int(chosen[0])


def weight_dtype(args: argparse.Namespace) -> torch.dtype:
    return dtype_of(args.mixed_precision, torch.float32)


def training_length(args: argparse.Namespace, steps_per_epoch: int) -> tuple[int, int]:
    """``(max_train_steps, num_epochs)``; ``--max_train_epochs`` wins over ``--max_train_steps``."""
    if steps_per_epoch < 1:
        raise UserError("the dataset has no training batches: check the image folders and repeats in the plan above")
    if args.max_train_epochs is not None:
        return args.max_train_epochs * steps_per_epoch, args.max_train_epochs
    return args.max_train_steps, math.ceil(args.max_train_steps / steps_per_epoch)


def module_fingerprint(module: torch.nn.Module) -> str:
    from library.training.text_cache import encoder_fingerprint

    return encoder_fingerprint(module)


def vae_cache_key(vae: torch.nn.Module, dtype: torch.dtype) -> str:
    """The latent cache's ``cache_key`` for ``vae`` (already cast to ``dtype``): its weights and dtype.

    Shared with ``finetune/prepare_buckets_latents.py`` so that its latents are reused by training."""
    return f"vae-{module_fingerprint(vae)[:16]}-{str(dtype).removeprefix('torch.')}"


def optimizer_class_name(optimizer: Any) -> str:
    """``module.Class`` of the optimizer (inside accelerate's wrapper), as recorded in a state."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return f"{type(inner).__module__}.{type(inner).__qualname__}"


def make_vae_encoder(vae: torch.nn.Module, device: torch.device,
                     dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """``encode(images in [-1, 1]) -> unscaled latents`` (the distribution's mean: deterministic, so
    cached and uncached runs train on the same latents)."""

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        out = vae.encode(images.to(device, dtype)).latent_dist.mode()
        return out.float()

    return encode


@dataclass
class Run:
    """Everything the loop works with. The diffusion recipes' runs are assembled by :func:`build_run`; the
    fields after ``fused_backward`` are theirs (a recipe that brings its own model leaves them unset and
    keeps what it needs on itself)."""

    args: argparse.Namespace
    accelerator: Any
    recipe: LoopRecipe
    loader: Any  # len(), iteration, set_epoch(epoch, skip_batches=...): see EpochLoader / IndexEpochLoader
    val_loader: Any
    optimizer: Any
    lr_scheduler: Any
    lr_names: list[str]
    names: OutputNames
    max_train_steps: int
    num_epochs: int
    seed: int
    generator: torch.Generator
    metadata: dict[str, str] = field(default_factory=dict)
    sample_prompts: list[Any] = field(default_factory=list)  # what samples are made from (prompts, images)
    resumed: Any = None
    optimizer_name: str = ""
    deepspeed: bool = False  # DeepSpeed averages, clips and steps inside the last backward of each step
    fused_flush: Any = None  # with fused_backward: called after each step's backward (blockwise groups left over)
    fused_backward: bool = False  # the optimizer steps inside backward (--fused_backward_pass)
    models: Any = None
    group: Any = None
    params: DatasetGroupParams | None = None
    noise_scheduler: Any = None
    noise_settings: Any = None
    loss_settings: Any = None
    flow_settings: Any = None  # FlowMatchingSettings of a flow-matching family
    text: Any = None
    weight_dtype: torch.dtype = torch.float32
    vae_encode: Any = None
    block_swap: Any = None  # library.training.block_swap.BlockSwap with --blocks_to_swap


def enable_text_encoder_checkpointing(text_encoder: torch.nn.Module) -> None:
    """transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias that warns on every run)."""
    enable = getattr(text_encoder, "activation_checkpointing_enable", None)
    (enable or text_encoder.gradient_checkpointing_enable)()


def _load_models(args: argparse.Namespace, recipe: Recipe, family: ModelFamily, accelerator: Any,
                 dtype: torch.dtype) -> tuple[Any, str, torch.dtype, bool]:
    """Load the models, let the recipe set up what it trains, apply ``--fp8_base`` and put the VAE and text
    encoders on the device; returns the models, the attention kernels' name, the VAE's dtype and whether the
    denoiser still waits to be placed (:func:`_place_denoiser`).

    A recipe that needs no frozen model after caching (LoRA) loads a family's weights as stored, and the
    denoiser is cast and placed last, once the text encoders and VAE may have been released: a float16
    checkpoint is then never held in float32 beside the encoders."""
    from library.models.fp8 import move_keeping_fp8
    from library.training.memory import apply_fp8_base

    device = accelerator.device
    defer = family.spec.loads_stored_dtype and not recipe.needs_frozen_models and not getattr(
        args, "base_weights", None)  # merging base weights needs the working precision
    models = family.spec.load(args, family, device=device if args.lowram else "cpu",
                              dtype=None if defer else torch.float32)
    attention = family.spec.set_attention(models, bool(args.xformers))
    for module in (models.unet, models.vae, *models.text_encoders):
        module.requires_grad_(False)
        module.eval()
    fp8 = apply_fp8_base(models, args, frozen_text_encoders="text_encoder" not in recipe.trained_base_modules())
    if fp8 and accelerator.is_main_process:
        print(f"float8 weights (--fp8_base): {', '.join(fp8)}", flush=True)
    recipe.setup(models, args, device)  # after fp8: a LoRA wraps the float8 layers' forward
    trained = recipe.trained_base_modules()
    vae_dtype = torch.float32 if args.no_half_vae or (dtype == torch.float16 and not family.vae_half_safe) else dtype
    if vae_dtype != dtype and not args.no_half_vae and accelerator.is_main_process:
        print(f"the {family.name} VAE overflows in float16: it runs in float32 (as with --no_half_vae)", flush=True)
    move_module(models.vae, device, vae_dtype)
    for te in models.text_encoders:
        move_keeping_fp8(te, device, torch.float32 if "text_encoder" in trained else dtype)
    if recipe.trains_text_encoder() and (args.gradient_checkpointing or getattr(args, "cpu_offload_checkpointing",
                                                                                False)):
        for te in models.text_encoders:
            enable_text_encoder_checkpointing(te)
            te.train()
    return models, attention, vae_dtype, defer


def _place_denoiser(models: Any, args: argparse.Namespace, recipe: Recipe, device: torch.device,
                    dtype: torch.dtype, *, verbose: bool) -> Any:
    """Cast the denoiser to its training dtype on the device (see ``memory.place_denoiser``), turn on its
    gradient checkpointing and ``--torch_compile``; returns the block swap (or None)."""
    from library.training.compile import compile_denoiser
    from library.training.memory import enable_checkpointing, place_denoiser

    block_swap = place_denoiser(models, args, device,
                                torch.float32 if "unet" in recipe.trained_base_modules() else dtype)
    if args.gradient_checkpointing or getattr(args, "cpu_offload_checkpointing", False):
        enable_checkpointing(models.unet, args, device)
        models.unet.train()
    compile_denoiser(models.unet, args, verbose=verbose)
    return block_swap


def build_run(args: argparse.Namespace, recipe: Recipe, checked: Checked, accelerator: Any, group: Any, *,
              seed: int, max_train_steps: int, num_epochs: int) -> Run:
    """Load the models and build the trained modules, caches, optimizer and scheduler; read ``--resume``."""
    from accelerate.utils import set_seed

    from library.dataset import make_train_loader
    from library.training.flow_matching import FlowMatchingSettings
    from library.training.losses import LossSettings
    from library.training.noise import NoiseSettings, make_noise_scheduler
    from library.training.optimizers import create_optimizer, uses_relative_step
    from library.training.schedulers import create_scheduler
    from library.training.text_cache import TOKENIZATION_VERSION, TextConditioner, encoder_fingerprint

    device = accelerator.device
    dtype = weight_dtype(args)
    set_seed(seed)
    family = checked.family
    models, attention, vae_dtype, deferred = _load_models(args, recipe, family, accelerator, dtype)
    verbose = accelerator.is_main_process
    block_swap = None if deferred else _place_denoiser(models, args, recipe, device, dtype, verbose=verbose)

    vae_encode = make_vae_encoder(models.vae, device, vae_dtype)
    if args.cache_latents or args.cache_latents_to_disk:
        group.cache_latents(vae_encode, cache_key=vae_cache_key(models.vae, vae_dtype),
                            to_disk=args.cache_latents_to_disk, batch_size=args.vae_batch_size,
                            process_index=accelerator.process_index,
                            num_processes=accelerator.num_processes, family_suffix=family.cache_suffix)
        accelerator.wait_for_everyone()

    encoding = models.family.spec.text_encoding(models, args)
    cache_dir = identity = None
    if args.cache_text_encoder_outputs_to_disk:
        cache_dir = Path(args.output_dir) / ".cache" / "text_encoder_outputs"
        fingerprints = "|".join(encoder_fingerprint(te) for te in models.text_encoders)
        identity = (f"{fingerprints}|tokenization={TOKENIZATION_VERSION}|clip_skip={args.clip_skip}|"
                    f"max_tokens={args.max_token_length}|weighted={args.weighted_captions}|{dtype}")
        if getattr(encoding, "cache_settings", ""):
            identity += f"|{encoding.cache_settings}"
    text = TextConditioner(encoding, weighted=args.weighted_captions, cache=checked.cache_text,
                           cache_dir=cache_dir, identity=identity or "")
    releasable = not (recipe.needs_frozen_models or checked.sample_prompts)  # nothing uses the frozen models later
    if checked.cache_text and not recipe.trains_text_encoder():
        asked = bool(args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk)
        # cached unasked only to free the encoders: never when the outputs would take more memory than they do
        budget = None if asked or not releasable else sum(module_bytes(te) for te in models.text_encoders)
        text.fill(group.fixed_captions(), device, budget_bytes=budget)
    if releasable:
        release_frozen_models(models, text, recipe, latents_cached=group.latents is not None,
                              verbose=accelerator.is_main_process)
    if deferred:  # cast only now: the released encoders' memory is free again
        block_swap = _place_denoiser(models, args, recipe, device, dtype, verbose=verbose)
    text = recipe.text_conditioning(text)

    workers = min(args.max_data_loader_n_workers, os.cpu_count() or 1)
    # workers are always kept between epochs (sd-scripts restarted them every epoch unless
    # --persistent_data_loader_workers, leaving the GPU idle at each epoch start)
    loader_kwargs = dict(seed=seed, num_workers=workers, persistent_workers=True,
                         process_index=accelerator.process_index, num_processes=accelerator.num_processes)
    loader = make_train_loader(group, grad_accum=args.gradient_accumulation_steps, **loader_kwargs)
    val_loader = make_train_loader(group, validation=True, **loader_kwargs) if group.validation else None

    groups, lr_names = recipe.param_groups(args)
    optimizer_name, optimizer = create_optimizer(groups, args)
    lr_scheduler = create_scheduler(optimizer, args, max_train_steps, num_processes=1,
                                    adafactor_relative_step=uses_relative_step(optimizer))
    if args.full_fp16 or args.full_bf16:
        recipe.cast_trained(torch.float16 if args.full_fp16 else torch.bfloat16)
        if block_swap is not None:
            block_swap.adopt_casts()
    optimizer = accelerator.prepare(optimizer)
    if args.full_fp16 and accelerator.scaler is not None:
        allow_fp16_gradients(accelerator.scaler)

    resumed = restore_state(args, recipe, optimizer, lr_scheduler, accelerator)
    if resumed is not None and block_swap is not None:
        from library.training.memory import optimizer_state_to

        optimizer_state_to(optimizer, device)
    fused_flush = _attach_fused_steps(args, optimizer, accelerator.num_processes)

    generator = seed_generators(seed, accelerator)
    if accelerator.is_main_process:
        print(f"attention: {attention}; weights {str(dtype).removeprefix('torch.')}, trained parameters: "
              f"{sum(p.numel() for p in recipe.trainable_parameters()):,}")
    return Run(
        args=args, accelerator=accelerator, recipe=recipe, models=models, group=group, params=checked.params,
        loader=loader, val_loader=val_loader, optimizer=optimizer, lr_scheduler=lr_scheduler, lr_names=lr_names,
        noise_scheduler=make_noise_scheduler(models.family.objective.is_v_prediction, bool(args.zero_terminal_snr)),
        noise_settings=NoiseSettings.from_args(args), loss_settings=LossSettings.from_args(args), text=text,
        flow_settings=FlowMatchingSettings.from_args(args) if family.objective.is_flow_matching else None,
        names=checked.names, max_train_steps=max_train_steps, num_epochs=num_epochs, weight_dtype=dtype,
        vae_encode=vae_encode, seed=seed, generator=generator, resumed=resumed, optimizer_name=optimizer_name,
        fused_backward=fused_flush is not None, fused_flush=fused_flush, block_swap=block_swap,
    )


def release_frozen_models(models: Any, text: Any, recipe: Recipe, *, latents_cached: bool, verbose: bool) -> None:
    """Free the frozen text encoders once every caption's outputs are cached (asked for with
    ``--cache_text_encoder_outputs``, or cached because the captions never change and the outputs take less
    memory than the encoders), and the VAE once every latent is. Called only when nothing later needs them (no
    samples; a recipe that saves only what it trains). Their weights move to the ``meta`` device: the memory is
    returned and any later use fails loudly."""
    released = []
    if text.cache and not recipe.trains_text_encoder():
        for te in models.text_encoders:
            move_module(te, "meta")
        text.encoders_released = True
        released.append("text encoders")
    if latents_cached and models.vae is not None:
        move_module(models.vae, "meta")
        released.append("VAE")
    if released:
        import gc

        gc.collect()
        release_host_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if verbose:
            print(f"{' and '.join(released)} released: their outputs are cached and nothing else in this run "
                  "uses them", flush=True)


def _attach_fused_steps(args: argparse.Namespace, optimizer: Any, num_processes: int) -> Any:
    """``--fused_backward_pass`` / ``--blockwise_fused_optimizers`` / ``--fused_optimizer_groups``: the hooks that step the optimizer inside
    the backward pass; returns what the loop calls at the end of each step (None without either option)."""
    from library.training.fused_backward import BlockwiseSteps, attach_fused_backward, uses_group_steps

    if uses_group_steps(args):
        return BlockwiseSteps(optimizer, max_grad_norm=args.max_grad_norm, num_processes=num_processes).flush
    if getattr(args, "fused_backward_pass", False):
        attach_fused_backward(optimizer, max_grad_norm=args.max_grad_norm, num_processes=num_processes)
        return lambda: None
    return None


def allow_fp16_gradients(scaler: Any) -> None:
    """``--full_fp16`` trains fp16 weights, so the gradients are fp16 too; torch's GradScaler refuses to
    unscale those unless told they are allowed."""
    unscale = scaler._unscale_grads_

    def unscale_allowing_fp16(optimizer: Any, inv_scale: Any, found_inf: Any, allow_fp16: bool) -> Any:
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_allowing_fp16


def restore_state(args: argparse.Namespace, recipe: LoopRecipe, optimizer: Any, lr_scheduler: Any,
                  accelerator: Any) -> Any:
    """Load ``--resume`` (if given) into the recipe, optimizer, scheduler and grad scaler; returns the loaded
    state (its position and RNG streams are restored by the loop), or None."""
    from library.training.state import load_state

    if not args.resume:
        return None
    resumed = load_state(args.resume, process_index=accelerator.process_index,
                         num_processes=accelerator.num_processes)
    saved, current = resumed.info.get("optimizer"), optimizer_class_name(optimizer)
    if saved is not None and saved != current:
        raise UserError(f"--resume {args.resume}: the state was saved with the optimizer {saved}, this run uses "
                        f"{current}; resume with the saved run's optimizer option")
    try:
        recipe.load_state_dict(resumed.weights)
        optimizer.load_state_dict(resumed.optimizer)
        lr_scheduler.load_state_dict(resumed.scheduler)
    except (RuntimeError, ValueError, KeyError) as err:
        detail = " ".join(str(err).split("\n")[:2]).replace("\t", "")
        raise UserError(f"--resume {args.resume}: the state does not fit this run ({detail}); resume with the "
                        "saved run's network, optimizer and scheduler options") from None
    if resumed.scaler is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(resumed.scaler)
    return resumed


def seed_generators(seed: int, accelerator: Any) -> torch.Generator:
    """Seed every global RNG for training (per process) and return the run's own generator."""
    from accelerate.utils import set_seed

    generator = torch.Generator(device=accelerator.device)
    generator.manual_seed(seed * 1000 + accelerator.process_index)
    set_seed(seed, device_specific=True)
    return generator


def init_trackers(args: argparse.Namespace, accelerator: Any, tracker_name: str) -> None:
    """Start TensorBoard / wandb when ``--log_with`` / ``--logging_dir`` asks for them."""
    from library.training.logging_utils import loggable_config

    if accelerator.log_with:
        accelerator.init_trackers(args.log_tracker_name or tracker_name,
                                  config=loggable_config(args) if args.log_config else None,
                                  init_kwargs={"wandb": {"name": args.wandb_run_name}} if args.wandb_run_name else {})


def assemble_run(args: argparse.Namespace, recipe: LoopRecipe, accelerator: Any, *, names: OutputNames,
                 loader: Any, val_loader: Any, optimizer: Any, lr_scheduler: Any, lr_names: list[str], seed: int,
                 max_train_steps: int, num_epochs: int, sample_prompts: list[Any] | None = None,
                 deepspeed_model: torch.nn.Module | None = None) -> Run:
    """The :class:`Run` of a recipe that brings its own model, data and optimizer (a captioner, a VLM):
    prepares the optimizer, restores ``--resume`` and seeds the RNGs, as :func:`build_run` does for the
    diffusion recipes. Call it after the recipe's model is set up and before :func:`init_trackers`. With a
    DeepSpeed accelerator, ``deepspeed_model`` (the recipe's model) is prepared with the optimizer into a DeepSpeed
    engine, which accelerator.backward drives; the recipe keeps calling its own module."""
    deepspeed = getattr(accelerator.state, "deepspeed_plugin", None) is not None
    if deepspeed:
        if deepspeed_model is None:
            raise ValueError("a DeepSpeed run needs the recipe's model (deepspeed_model)")
        _, optimizer = accelerator.prepare(deepspeed_model, optimizer)
    else:
        optimizer = accelerator.prepare(optimizer)
    resumed = restore_state(args, recipe, optimizer, lr_scheduler, accelerator)
    generator = seed_generators(seed, accelerator)
    return Run(args=args, accelerator=accelerator, recipe=recipe, loader=loader, val_loader=val_loader,
               optimizer=optimizer, lr_scheduler=lr_scheduler, lr_names=lr_names, names=names,
               max_train_steps=max_train_steps, num_epochs=num_epochs, seed=seed, generator=generator,
               sample_prompts=list(sample_prompts or []), resumed=resumed,
               optimizer_name=optimizer_class_name(optimizer), deepspeed=deepspeed)
