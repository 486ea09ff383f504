"""The one training loop (LoRA, DreamBooth, fine-tuning and the captioners differ only in their recipe).

Per optimizer step: for each micro-batch of the accumulation group, the recipe's loss (for the diffusion
recipes: latents, cached or VAE-encoded, and text conditioning, cached when the encoder is frozen and
captions are fixed, noise and timesteps, the UNet prediction and the loss); the group's gradients are
averaged across processes, clipped, and the optimizer and LR scheduler step. Then logging, samples,
validation and saving, all keyed to the global step.

Accumulation is explicit (the group of the last batches of an epoch may be shorter and is averaged over
its own size), and gradients are averaged with one all-reduce per step, so the trained parameters need no
DDP wrapper and any recipe works unchanged on one or many processes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from library.config.params import DatasetSupport
from library.errors import UserError
from library.training.logging_utils import LossRecorder, describe_lr_groups
from library.training.outputs import prune, save_or_emergency
from library.training.preparation import (Run, build_run, check_run, init_trackers, make_accelerator,
                                          optimizer_class_name, shared_seed, training_length)
from library.training.recipes import Recipe, SaveInfo
from library.training.sampling import sampling_due
from library.training.state import (Progress, capture_rng, check_position, check_process_count, restore_rng,
                                    save_state)
from library.training.stopping import StopRequest, stop_signals

VALIDATION_TIMESTEP_POINTS = 4


def prepare_training(args: argparse.Namespace, recipe: Recipe, support: DatasetSupport, *,
                     tracker_name: str = "network_train", metadata: Any = None,
                     families: Sequence[str] = ("sd",)) -> Run | None:
    """Check everything, print the plan, load the models: a :class:`Run` ready for :func:`train` (None for
    ``--debug_dataset``, which only shows the data). ``metadata(run) -> dict[str, str]`` builds the
    metadata of the saved files; ``families`` names the model family specs the script trains."""
    from library.dataset import build_dataset_group, debug_dataset, make_train_loader

    checked = check_run(args, recipe, support, families)
    accelerator = make_accelerator(args, tracker_name)
    resume = checked.resume_info
    if resume is not None:  # before any model loads
        check_process_count(args.resume, resume["num_processes"], accelerator.num_processes)
    seed = shared_seed(args, accelerator, resume.get("seed") if resume else None)
    group = build_dataset_group(checked.params, seed=seed, required_step=checked.family.bucket_step)
    recipe.prepare_dataset(group)
    n, ga = accelerator.num_processes, args.gradient_accumulation_steps
    max_train_steps, num_epochs = training_length(args, group.steps_per_epoch(n, ga))
    group.set_max_train_steps(max_train_steps)  # before any loader: token warmup may be a ratio of it
    if resume is not None:
        check_position(args.resume, resume, max_train_steps=max_train_steps,
                       batches_per_epoch=group.batches_per_epoch(n))
        if resume.get("dataset", group.fingerprint()) != group.fingerprint() and accelerator.is_main_process:
            print(f"warning: the dataset differs from the one the resumed run trained on (images, repeats, "
                  "resolution or batch size changed), so the data order and position differ from an "
                  "uninterrupted run", flush=True)
    if args.debug_dataset:
        debug_dataset(group, make_train_loader(group, seed=seed, num_workers=0, persistent_workers=False,
                                               grad_accum=ga), epochs=num_epochs, steps=max_train_steps,
                      family=checked.family)
        return None
    if accelerator.is_main_process:
        print(f"model: {args.pretrained_model_name_or_path}", flush=True)
        print(group.plan(num_processes=n, grad_accum=ga, epochs=num_epochs, steps=max_train_steps,
                         family=checked.family), flush=True)
    run = build_run(args, recipe, checked, accelerator, group, seed=seed, max_train_steps=max_train_steps,
                    num_epochs=num_epochs)
    if metadata is not None:
        run.metadata = metadata(run)
    run.sample_prompts = checked.sample_prompts
    init_trackers(args, accelerator, tracker_name)
    return run


def _remove_stale_temporaries(names: Any) -> None:
    """Hidden temporaries of this run's names left by a killed save (``kill -9``): removed, and said."""
    from library.io_utils import remove_stale_temporaries
    from library.training.outputs import owns_temporary

    removed = remove_stale_temporaries(names.output_dir, owns_temporary(names))
    if removed:
        shown = ", ".join(p.name for p in removed)
        print(f"removed {len(removed)} unfinished temporary save(s) left in {names.output_dir} by an interrupted "
              f"run: {shown}", flush=True)


def run_training(args: argparse.Namespace, recipe: Recipe, support: DatasetSupport, *,
                 tracker_name: str = "network_train", metadata: Any = None,
                 families: Sequence[str] = ("sd",)) -> Path | None:
    """:func:`prepare_training` then :func:`train`; returns the final weights file."""
    run = prepare_training(args, recipe, support, tracker_name=tracker_name, metadata=metadata, families=families)
    if run is None:
        return None
    try:
        return train(run)
    finally:
        run.accelerator.end_training()


@contextlib.contextmanager
def _side_work(run: Run) -> Iterator[None]:
    """Sampling, validation and saving: trained modules in eval mode, every RNG stream untouched afterwards
    (so they never change what the training sees)."""
    rng = capture_rng()
    gen_state = run.generator.get_state()
    run.recipe.train_mode(False)
    _optimizer_mode(run, train=False)
    try:
        yield
    finally:
        _optimizer_mode(run, train=True)
        run.recipe.train_mode(True)
        restore_rng(rng)
        run.generator.set_state(gen_state)


def _optimizer_mode(run: Run, *, train: bool) -> None:
    """Schedule-free optimizers keep two weight sets; eval mode selects the one to sample and save."""
    from library.training.optimizers import optimizer_train_eval

    optimizer_train_eval(run.optimizer, train)


def batch_loss(run: Run, batch: dict[str, Any], global_step: int, *, timesteps: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The loss of one batch: random timesteps from ``run.generator``, or the given ``timesteps`` with noise
    from ``generator`` (validation)."""
    from library.training.losses import compute_training_loss
    from library.training.noise import sample_noise_and_timesteps

    acc, models = run.accelerator, run.models
    device = acc.device
    run.recipe.before_forward(batch)  # before the text encoder, which may carry part of the network
    latents = batch["latents"] if "latents" in batch else run.vae_encode(batch["images"])
    latents = models.family.scale_latents(latents.to(device, torch.float32))

    te_trains = run.recipe.text_encoder_trains_at(global_step) and timesteps is None
    with torch.set_grad_enabled(te_trains and torch.is_grad_enabled()), acc.autocast():
        context = run.text(list(batch["captions"]), device)

    cond = models.family.spec.conditioning(context, batch, device)
    if models.family.objective.is_flow_matching:
        return flow_batch_loss(run, batch, latents, cond, timesteps=timesteps, generator=generator)
    if timesteps is None:
        noise, noisy, t = sample_noise_and_timesteps(latents, run.noise_scheduler, run.noise_settings, run.generator)
    else:
        t = timesteps.to(device)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(device)
        noisy = run.noise_scheduler.add_noise(latents, noise, t)

    with acc.autocast():
        pred = models.family.spec.forward(models.denoiser, noisy, t, cond, run.weight_dtype)
    if run.noise_scheduler.config.prediction_type == "v_prediction":
        target = run.noise_scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    masks = batch.get("alpha_masks")
    return compute_training_loss(pred, target, t, run.noise_scheduler, settings=run.loss_settings,
                                 loss_weights=batch["loss_weights"].to(device), masks=masks)


def flow_batch_loss(run: Run, batch: dict[str, Any], latents: torch.Tensor, cond: Any, *,
                    timesteps: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The flow-matching loss of one batch (``library.training.flow_matching``); given ``timesteps`` (validation)
    are read as ``sigma = t / 1000`` (at least 1/1000) with noise from ``generator``."""
    from library.training.flow_matching import FlowBatch, flow_matching_loss, make_flow_batch, prediction_and_target

    acc, models, device = run.accelerator, run.models, run.accelerator.device
    if timesteps is None:
        fb = make_flow_batch(latents, run.flow_settings, run.noise_settings, run.generator)
    else:
        sigmas = (timesteps.to(device).float() / 1000).clamp(min=1e-3)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(device)
        s = sigmas.view(-1, 1, 1, 1)
        fb = FlowBatch(noise=noise, noisy=(1 - s) * latents + s * noise, sigmas=sigmas)
    with acc.autocast():
        pred = models.family.spec.forward(models.denoiser, fb.noisy, fb.timesteps, cond, run.weight_dtype)
    pred, target, weighting = prediction_and_target(pred.float(), latents, fb, run.flow_settings)
    return flow_matching_loss(pred, target, fb.sigmas, settings=run.loss_settings, weighting=weighting,
                              loss_weights=batch["loss_weights"].to(device), masks=batch.get("alpha_masks"))


def _all_reduce_gradients(run: Run, params: list[torch.nn.Parameter]) -> None:
    """Average the step's gradients over processes (one flat all-reduce per dtype)."""
    if run.accelerator.num_processes == 1:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    params = [p for p in params if p.requires_grad]  # a recipe may freeze some mid-run
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= run.accelerator.num_processes
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)


def _check_finite(value: float, progress: Progress, args: argparse.Namespace) -> None:
    if math.isfinite(value):
        return
    raise UserError(
        f"the loss became {value} at step {progress.global_step + 1} (epoch {progress.epoch + 1}); training stopped "
        "before the weights were updated with it. Likely causes: a learning rate too high (--learning_rate, "
        "--unet_lr, --text_encoder_lr), fp16 overflow (use --mixed_precision bf16, or --no_half_vae when the VAE "
        "gives NaN latents in fp16), NaN/inf latents in a cache (delete the .npz files), or a damaged base model. "
        "The last saved state (--save_state with --save_every_n_steps) can be resumed with a lower learning rate"
    )


def _current_lrs(run: Run) -> dict[str, float]:
    logs = {}
    for name, group in zip(run.lr_names, run.optimizer.param_groups):
        logs[f"lr/{name}"] = float(group["lr"])
        if "d" in group:
            logs[f"lr/d*lr/{name}"] = float(group["d"] * group["lr"])
    return logs or describe_lr_groups(run.lr_names, run.lr_scheduler.get_last_lr())


def train(run: Run) -> Path:
    """The loop; returns the path of the final weights."""
    args, acc, recipe = run.args, run.accelerator, run.recipe
    if acc.is_main_process:  # every recipe's run, before its first save
        _remove_stale_temporaries(run.names)
    progress = dataclasses.replace(run.resumed.progress) if run.resumed else Progress()
    if run.resumed:
        restore_rng(run.resumed.rng)
        run.generator.set_state(run.resumed.rng["noise_generator"])
        if acc.is_main_process:
            print(f"resumed from {args.resume}: epoch {progress.epoch + 1}, step {progress.global_step}, "
                  f"{progress.batches_done} batches of the epoch done", flush=True)
    params = recipe.trainable_parameters()
    recorder = LossRecorder()
    keep_snapshots = bool(args.save_state)  # states at any step (and on Ctrl-C) need the step's RNG streams
    snapshot = _snapshot(run, progress)
    recipe.train_mode(True)
    _optimizer_mode(run, train=True)  # schedule-free optimizers start in eval mode
    if progress.global_step == 0 and getattr(args, "validate_at_first", False):
        value = _validate(run, 0)
        if value is not None and acc.log_with:
            acc.log({"loss/validation/current": value}, step=0)
    if progress.global_step == 0 and sampling_due(args, step=0):
        _sample(run, 0, None)

    bar = tqdm(total=run.max_train_steps, initial=progress.global_step, disable=not acc.is_main_process,
               desc="steps", dynamic_ncols=True, smoothing=0.1)
    ga = args.gradient_accumulation_steps
    group_loss = torch.zeros((), device=acc.device)
    try:
        with stop_signals(acc.num_processes) as stop:
            while progress.epoch < run.num_epochs and progress.global_step < run.max_train_steps:
                run.loader.set_epoch(progress.epoch, skip_batches=progress.batches_done)
                recipe.on_epoch_start(progress.epoch)
                recorder.start_epoch()
                n_batches = len(run.loader)
                for batch in run.loader:
                    b = progress.batches_done
                    group_start = (b // ga) * ga
                    group_len = min(ga, n_batches - group_start)
                    loss = recipe.batch_loss(run, batch, progress.global_step)
                    _before_backward(run, loss, progress, last=b + 1 - group_start == group_len)
                    acc.backward(loss / group_len)
                    group_loss += loss.detach().float() / group_len
                    progress.batches_done += 1
                    if progress.batches_done - group_start < group_len:
                        continue
                    step_loss, extra = _optimizer_step(run, params, progress, group_loss, stop)
                    group_loss = torch.zeros((), device=acc.device)
                    if keep_snapshots:
                        snapshot = _snapshot(run, progress)

                    recorder.add(group_start // ga, step_loss)
                    logs = {"loss/current": step_loss, "loss/average": recorder.average, **_current_lrs(run), **extra}
                    bar.set_postfix(loss=f"{recorder.average:.4f}", refresh=False)  # shown by the update
                    bar.update(1)
                    _after_step(run, progress, snapshot, logs)
                    if acc.log_with:
                        acc.log(logs, step=progress.global_step)
                    if stop.agreed and progress.global_step < run.max_train_steps:
                        print(f"process {acc.process_index}: stopped after step {progress.global_step}", flush=True)
                        raise KeyboardInterrupt
                    if progress.global_step >= run.max_train_steps:
                        if progress.batches_done == n_batches:  # the last step also ended the epoch
                            _end_epoch(run, progress, recorder)
                        break
                else:  # the epoch ran to its end
                    _end_epoch(run, progress, recorder)
                    if keep_snapshots:
                        snapshot = _snapshot(run, progress)
    except KeyboardInterrupt:
        bar.close()
        if args.save_state and (acc.num_processes == 1 or stop.agreed):
            path = run.names.step_state(snapshot[0].global_step)
            _write_state(run, path, snapshot)
            if acc.is_main_process:
                print(f"\ninterrupted: state of step {snapshot[0].global_step} saved to {path}; continue with "
                      f"--resume {path}", flush=True)
        raise
    bar.close()
    return _finish(run, progress, _snapshot(run, progress))


def _before_backward(run: Run, loss: torch.Tensor, progress: Progress, *, last: bool) -> None:
    """DeepSpeed steps inside the backward of a step's last micro-batch (``last``); with it, or with a fused
    backward pass, the weights change during backward, so the loss is checked before it."""
    if run.deepspeed:
        run.accelerator.sync_gradients = last
    if run.fused_backward or run.deepspeed:
        _check_finite(_reduce_mean(run, loss.detach().float().item()), progress, run.args)


def _optimizer_step(run: Run, params: list[torch.nn.Parameter], progress: Progress,
                    group_loss: torch.Tensor, stop: StopRequest) -> tuple[float, dict[str, float]]:
    """Check the step's loss, average the gradients over processes, clip, step; returns the loss (mean over
    processes) and the recipe's values to log. A stop request of any process is shared in the same reduction
    (``stop.agreed``)."""
    args, acc = run.args, run.accelerator
    if acc.num_processes > 1:  # the one host sync of the step carries the stop requests
        flag = torch.tensor(float(stop.requested), device=group_loss.device)
        both = _reduce_mean(run, torch.stack([group_loss.float(), flag]))
        step_loss, stop.agreed = both[0], both[1] > 0
    else:
        step_loss = float(group_loss)
    _check_finite(step_loss, progress, args)
    if not (run.fused_backward or run.deepspeed):  # else each parameter was stepped during backward
        _all_reduce_gradients(run, params)
        if args.max_grad_norm:
            acc.clip_grad_norm_(params, args.max_grad_norm)
        run.optimizer.step()
    elif run.fused_flush is not None:
        run.fused_flush()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    progress.global_step += 1
    return step_loss, run.recipe.after_optimizer_step(args, acc.device)


def _reduce_mean(run: Run, value: torch.Tensor | float) -> Any:
    """The mean of ``value`` over processes: a Python float, or a list of floats for a 1-d tensor."""
    if run.accelerator.num_processes == 1:
        return value.tolist() if isinstance(value, torch.Tensor) and value.dim() == 1 else float(value)
    tensor = torch.as_tensor(value, device=run.accelerator.device, dtype=torch.float64)
    reduced = run.accelerator.reduce(tensor.reshape(-1), reduction="mean")
    return reduced.tolist() if tensor.dim() == 1 else float(reduced[0].item())


def _snapshot(run: Run, progress: Progress) -> tuple[Progress, dict[str, Any]]:
    """The position and RNG streams at an optimizer-step boundary (what a state saved now must hold)."""
    rng = capture_rng()
    rng["noise_generator"] = run.generator.get_state()
    return dataclasses.replace(progress), rng


def _after_step(run: Run, progress: Progress, snapshot: tuple[Progress, dict[str, Any]],
                logs: dict[str, float]) -> None:
    args, step = run.args, progress.global_step
    if step >= run.max_train_steps:
        return
    if sampling_due(args, step=step):
        _sample(run, step, None)
    if args.validate_every_n_steps and step % args.validate_every_n_steps == 0:
        value = _validate(run, step)
        if value is not None:
            logs["loss/validation/current"] = value
    if args.save_every_n_steps and step % args.save_every_n_steps == 0:
        _save_weights(run, run.names.step(step), progress)
        if args.save_last_n_steps:
            _prune(run, "step", state=False, keep_after=step - args.save_last_n_steps)
        if args.save_state:
            _write_state(run, run.names.step_state(step), snapshot)
            if args.save_last_n_steps_state:
                _prune(run, "step", state=True, keep_after=step - args.save_last_n_steps_state)


def _end_epoch(run: Run, progress: Progress, recorder: LossRecorder) -> None:
    args, acc = run.args, run.accelerator
    done = progress.epoch + 1
    progress.epoch += 1
    progress.batches_done = 0
    logs = {"loss/epoch": recorder.epoch_average}
    if args.validate_every_n_epochs and done % args.validate_every_n_epochs == 0:
        value = _validate(run, progress.global_step)
        if value is not None:
            logs["loss/validation/epoch"] = value
    if acc.log_with:
        acc.log(logs, step=progress.global_step)
    if done >= run.num_epochs:
        return
    if sampling_due(args, step=progress.global_step, epoch=done):
        _sample(run, progress.global_step, done)
    every = args.save_every_n_epochs
    if args.save_n_epoch_ratio:
        every = max(1, run.num_epochs // args.save_n_epoch_ratio)
    if every and done % every == 0:
        _save_weights(run, run.names.epoch(done), progress)
        if args.save_last_n_epochs:
            _prune(run, "epoch", state=False, keep_after=done - every * args.save_last_n_epochs)
        if args.save_state:
            _write_state(run, run.names.epoch_state(done), _snapshot(run, progress))
            if args.save_last_n_epochs_state:
                _prune(run, "epoch", state=True, keep_after=done - every * args.save_last_n_epochs_state)


def _finish(run: Run, progress: Progress, snapshot: tuple[Progress, dict[str, Any]]) -> Path:
    args, acc = run.args, run.accelerator
    if run.sample_prompts and (args.sample_every_n_epochs or args.sample_every_n_steps):
        _sample(run, progress.global_step, progress.epoch if args.sample_every_n_epochs else None)
    path = run.names.final()
    _save_weights(run, path, progress)
    if args.save_state or args.save_state_on_train_end:
        _write_state(run, run.names.final_state(), snapshot)
    if acc.is_main_process:
        print(f"saved {path}", flush=True)
    return path


def _prune(run: Run, kind: str, *, state: bool, keep_after: int) -> None:
    if run.accelerator.is_main_process:
        prune(run.names, kind, state=state, keep_after=keep_after)


def _save_weights(run: Run, path: Path, progress: Progress) -> None:
    acc = run.accelerator
    with _gathered_weights(run):
        if acc.is_main_process:
            save_or_emergency(_weights_saver(run, progress), path, run.names, progress.global_step)
        acc.wait_for_everyone()


def _gathered_weights(run: Run) -> Any:
    """ZeRO-3 shards the trained weights over the processes: every process gathers them for a save."""
    plugin = getattr(run.accelerator.state, "deepspeed_plugin", None) if run.deepspeed else None
    if plugin is None or plugin.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(run.recipe.trainable_parameters(), modifier_rank=None)


def _weights_saver(run: Run, progress: Progress) -> Callable[[Path], None]:
    """``save(path)``: the trained weights at ``progress`` with their metadata (side work: RNGs untouched)."""
    from library.training.lora_metadata import per_save_metadata

    def save(path: Path) -> None:
        with _side_work(run):
            meta = per_save_metadata(run.metadata, global_step=progress.global_step, epoch=progress.epoch,
                                     minimal=bool(getattr(run.args, "no_metadata", False))) if run.metadata else {}
            run.recipe.save(path, SaveInfo(progress.global_step, progress.epoch, meta), run.args)

    return save


def _write_state(run: Run, path: Path, snapshot: tuple[Progress, dict[str, Any]]) -> None:
    progress, rng = snapshot
    acc = run.accelerator
    info = {"recipe": run.recipe.name, "seed": run.seed, "output_name": run.names.name,
            "optimizer": optimizer_class_name(run.optimizer), "saved_at": time.time()}
    if run.group is not None:  # recipes that bring their own data have no dataset group
        info["dataset"] = run.group.fingerprint()

    def write(target: Path) -> None:
        save_state(target, acc, progress=progress, weights=run.recipe.state_dict(),
                   optimizer=run.optimizer.state_dict(), scheduler=run.lr_scheduler.state_dict(),
                   scaler=acc.scaler.state_dict() if acc.scaler is not None else None, rng=rng, info=info)

    # a state that cannot be written: keep at least the trained weights
    save_or_emergency(write, path, run.names, progress.global_step, weights=_weights_saver(run, progress))


def _sample(run: Run, global_step: int, epoch: int | None) -> None:
    """The recipe's samples of the current weights (every process takes part)."""
    with _side_work(run), torch.no_grad():
        run.recipe.sample(run, global_step, epoch)
    run.accelerator.wait_for_everyone()


def _validate(run: Run, global_step: int) -> float | None:
    """The recipe's held-out loss."""
    with _side_work(run), torch.no_grad():
        return run.recipe.validation_loss(run, global_step)


def sample_images(run: Run, global_step: int, epoch: int | None) -> None:
    """Sample images with the current weights; each process renders its share of the prompts."""
    from library.training.sampling import generate_samples, prompts_for_process, sample_tag

    acc, models, args = run.accelerator, run.models, run.args
    prompts = prompts_for_process(run.sample_prompts, acc.process_index, acc.num_processes)
    if prompts:
        resolution = run.params.datasets[0].resolution
        run.recipe.before_forward({"network_multipliers": torch.ones(1)})  # samples show the full-strength LoRA
        if models.family.objective.is_flow_matching:
            from library.training.flow_sampling import generate_flow_samples

            generate_flow_samples(
                denoiser=models.unet, vae=models.vae, text_encode=lambda texts: run.text.encode(texts, acc.device),
                prompts=prompts, output_dir=args.output_dir, output_name=run.names.name,
                tag=sample_tag(step=global_step, epoch=epoch), default_size=resolution, device=acc.device,
                dtype=run.weight_dtype, family=models.family)
            return
        generate_samples(
            unet=models.unet, vae=models.vae, text_encode=lambda texts: run.text.encode(texts, acc.device),
            prompts=prompts, output_dir=args.output_dir, output_name=run.names.name,
            tag=sample_tag(step=global_step, epoch=epoch), default_size=resolution,
            device=acc.device, dtype=run.weight_dtype, v_parameterization=models.family.objective.is_v_prediction,
            latent_scale=models.family.latent_scale, sampler=args.sample_sampler,
            zero_terminal_snr=bool(args.zero_terminal_snr), spec=models.family.spec,
        )


def diffusion_validation_loss(run: Run, global_step: int) -> float | None:
    """Mean loss over the validation batches at fixed timesteps and fixed noise (comparable between calls)."""
    if run.val_loader is None:
        return None
    acc = run.accelerator
    lo, hi = run.noise_settings.timestep_range(run.noise_scheduler.config.num_train_timesteps)
    points = torch.linspace(lo, hi, VALIDATION_TIMESTEP_POINTS + 2)[1:-1].round().long()
    seed = run.params.datasets[0].validation_seed if run.params.datasets[0].validation_seed is not None else run.seed
    generator = torch.Generator(device=acc.device).manual_seed(seed + acc.process_index)
    total, count = 0.0, 0
    run.val_loader.set_epoch(0)
    for i, batch in enumerate(run.val_loader):
        if run.args.max_validation_steps is not None and i >= run.args.max_validation_steps:
            break
        size = len(batch["captions"])
        for t in points:
            loss = batch_loss(run, batch, global_step, timesteps=t.repeat(size), generator=generator)
            total += float(loss)
            count += 1
    return _reduce_mean(run, total / max(count, 1))
