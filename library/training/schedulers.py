"""Learning-rate schedulers from the sd-scripts options.

Public API (stable):

- ``add_scheduler_arguments(parser)``: ``--lr_scheduler`` (constant), ``--lr_warmup_steps`` / ``--lr_decay_steps``
  (steps as an int, a ratio of the training steps as a float below 1, or a percentage ``"10%"``; ``"1.0"`` is
  one step, unlike the reference which crashed on it), ``--lr_scheduler_num_cycles`` (1),
  ``--lr_scheduler_power`` (1.0), ``--lr_scheduler_min_lr_ratio``, ``--lr_scheduler_timescale``,
  ``--lr_scheduler_type`` (``module.Class``), ``--lr_scheduler_args k=v ...``.
- ``parse_step_count(text)``: the ``--lr_warmup_steps`` parser.
- ``validate_scheduler_args(args)``: every problem as one ``UserError`` (before models load).
- ``create_scheduler(optimizer, args, max_train_steps, num_processes=1, adafactor_relative_step=False)``.

Step counting: ``max_train_steps`` and integer ``--lr_warmup_steps`` / ``--lr_decay_steps`` are optimizer steps.
``num_processes`` is how many times ``scheduler.step()`` is called per optimizer step: accelerate's prepared
scheduler steps once per process (pass ``accelerator.num_processes``); a loop that calls ``step()`` itself once
per optimizer step passes 1. Every step count is multiplied by it, so warmup and decay last the same number of
optimizer steps on any number of GPUs (the reference multiplied only ``max_train_steps``, so an integer warmup
ended ``num_processes`` times too early).

Schedule-free optimizers get a constant schedule (they have no use for one); Adafactor with
``relative_step=True`` gets ``transformers``' ``AdafactorSchedule`` (which reports the lr Adafactor computes).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from transformers import optimization as tf_opt

from library.errors import UserError
from library.training.optimizers import is_schedule_free, parse_optimizer_args

logger = logging.getLogger(__name__)

WARMUP_FREE = ("constant", "piecewise_constant", "adafactor")
SCHEDULER_NAMES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                   "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant", "adafactor")


def parse_step_count(text: str | int | float) -> int | float:
    """``"100"`` / ``"1.0"`` -> 100 / 1 steps; ``"0.1"`` or ``"10%"`` -> the ratio 0.1 of the training steps."""
    if isinstance(text, bool):
        raise argparse.ArgumentTypeError(f"expected a number of steps, got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip()
        try:
            if s.endswith("%"):
                pct = float(s[:-1])
                if not 0 <= pct <= 100:
                    raise argparse.ArgumentTypeError(f"percentage must be between 0% and 100%, got {s}")
                return pct / 100.0
            value = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number of steps (100), a ratio below 1 (0.1) or a percentage (10%), got {s!r}") from None
    if value < 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    if 0 < value < 1:
        return value
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"a number of steps must be whole (or a ratio below 1), got {text!r}")
    return int(value)


def add_scheduler_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the learning-rate scheduler options (sd-scripts names and defaults)."""
    g = parser.add_argument_group("learning-rate scheduler")
    g.add_argument("--lr_scheduler", type=str, default="constant",
                   help="scheduler: " + ", ".join(SCHEDULER_NAMES) + " (default constant)")
    g.add_argument("--lr_warmup_steps", type=parse_step_count, default=0,
                   help="warmup steps: an integer, a ratio of the training steps below 1, or a percentage like 10%%")
    g.add_argument("--lr_decay_steps", type=parse_step_count, default=0,
                   help="decay steps for warmup_stable_decay (integer, ratio below 1 or percentage)")
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1, help="restarts of cosine_with_restarts")
    g.add_argument("--lr_scheduler_power", type=float, default=1.0, help="power of the polynomial scheduler")
    g.add_argument("--lr_scheduler_timescale", type=int, default=None,
                   help="timescale of inverse_sqrt (default: the warmup steps, or 10000)")
    g.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None,
                   help="final lr as a ratio of the initial lr (cosine_with_min_lr, warmup_stable_decay)")
    g.add_argument("--lr_scheduler_type", type=str, default="",
                   help="custom scheduler class as module.Class (its arguments via --lr_scheduler_args)")
    g.add_argument("--lr_scheduler_args", type=str, default=None, nargs="*",
                   help='scheduler keyword arguments, e.g. "T_max=100"')


def _steps(value: Any, option: str) -> int | float:
    try:
        return parse_step_count(value if value is not None else 0)
    except argparse.ArgumentTypeError as err:
        raise UserError(f"{option}: {err}") from None


def _resolve_steps(value: int | float, total: int, num_processes: int) -> int:
    return int(value * total) if isinstance(value, float) else value * num_processes


def _custom_class(name: str) -> type:
    module_name, _, class_name = name.rpartition(".")
    if not module_name:
        raise UserError(f"--lr_scheduler_type {name!r} must be module.Class, e.g. torch.optim.lr_scheduler.StepLR")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"--lr_scheduler_type {name}: cannot import {module_name!r} ({err})") from err
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(f"--lr_scheduler_type {name}: module {module_name!r} has no class {class_name!r}")
    return cls


def validate_scheduler_args(args: Any) -> None:
    """Check the scheduler options; raises one ``UserError`` listing every problem."""
    problems = []
    name = str(getattr(args, "lr_scheduler", "constant") or "constant").lower()
    custom = getattr(args, "lr_scheduler_type", "") or ""
    steps: dict[str, int | float] = {}
    for option, attr in (("--lr_warmup_steps", "lr_warmup_steps"), ("--lr_decay_steps", "lr_decay_steps")):
        try:
            steps[attr] = _steps(getattr(args, attr, 0), option)
        except UserError as err:
            problems.append(err.message)
            steps[attr] = 0
    warmup, decay = steps["lr_warmup_steps"], steps["lr_decay_steps"]
    kwargs: dict[str, Any] = {}
    try:
        kwargs = parse_optimizer_args(getattr(args, "lr_scheduler_args", None), option="--lr_scheduler_args")
    except UserError as err:
        problems.append(err.message)
    if custom:
        try:
            _custom_class(custom)
        except UserError as err:
            problems.append(err.message)
        if warmup:
            problems.append("--lr_warmup_steps is not supported with --lr_scheduler_type; put the warmup into the "
                            "custom scheduler's --lr_scheduler_args")
    elif name.split(":")[0] not in SCHEDULER_NAMES:
        close = difflib.get_close_matches(name, SCHEDULER_NAMES, n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        problems.append(f"--lr_scheduler {name!r} is unknown{hint} (choices: {', '.join(SCHEDULER_NAMES)})")
    elif name in WARMUP_FREE and warmup:
        alt = " (use constant_with_warmup)" if name == "constant" else ""
        problems.append(f"--lr_scheduler {name} has no warmup, remove --lr_warmup_steps{alt}")
    if name == "piecewise_constant" and not custom and "step_rules" not in kwargs:
        problems.append('--lr_scheduler piecewise_constant needs --lr_scheduler_args "step_rules=\'1:10,0.1\'"')
    if isinstance(warmup, float) and isinstance(decay, float) and warmup + decay > 1:
        problems.append("--lr_warmup_steps and --lr_decay_steps together exceed the training steps")
    if problems:
        raise UserError.from_problems("invalid learning-rate scheduler options", problems)


def create_scheduler(optimizer: torch.optim.Optimizer, args: Any, max_train_steps: int, num_processes: int = 1,
                     adafactor_relative_step: bool = False) -> LRScheduler:
    """Create the scheduler for ``optimizer`` (see the module docstring for step counting)."""
    name = str(getattr(args, "lr_scheduler", "constant") or "constant").lower()
    kwargs = parse_optimizer_args(getattr(args, "lr_scheduler_args", None), option="--lr_scheduler_args")
    total = max_train_steps * num_processes
    warmup = _resolve_steps(_steps(getattr(args, "lr_warmup_steps", 0), "--lr_warmup_steps"), total, num_processes)
    decay = _resolve_steps(_steps(getattr(args, "lr_decay_steps", 0), "--lr_decay_steps"), total, num_processes)
    num_cycles = getattr(args, "lr_scheduler_num_cycles", 1) or 1
    min_lr_ratio = getattr(args, "lr_scheduler_min_lr_ratio", None)

    custom = getattr(args, "lr_scheduler_type", "") or ""
    if custom:
        return _custom_class(custom)(optimizer, **kwargs)
    if adafactor_relative_step or name.startswith("adafactor"):
        if not adafactor_relative_step:
            raise UserError("--lr_scheduler adafactor needs --optimizer_type AdaFactor with relative_step=True")
        if name not in ("constant", "adafactor") and not name.startswith("adafactor:"):
            logger.warning("AdaFactor with relative_step computes its own lr; --lr_scheduler %s is replaced by "
                           "the adafactor schedule", name)
        initial_lr = float(name.split(":", 1)[1]) if ":" in name else (getattr(args, "learning_rate", 0.0) or 0.0)
        return tf_opt.AdafactorSchedule(optimizer, initial_lr)
    if is_schedule_free(optimizer):
        if name != "constant" or warmup:
            logger.warning("schedule-free optimizers need no lr scheduler; --lr_scheduler %s is ignored (use the "
                           "optimizer's warmup_steps argument for a warmup)", name)
        return LambdaLR(optimizer, lambda _: 1.0)

    if name == "constant":
        return tf_opt.get_constant_schedule(optimizer, **kwargs)
    if name == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        return get_piecewise_constant_schedule(optimizer, **kwargs)
    if name == "constant_with_warmup":
        return tf_opt.get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup, **kwargs)
    if name == "inverse_sqrt":
        timescale = getattr(args, "lr_scheduler_timescale", None)
        timescale = timescale * num_processes if timescale else None
        return tf_opt.get_inverse_sqrt_schedule(optimizer, num_warmup_steps=warmup, timescale=timescale, **kwargs)
    if name == "cosine_with_restarts":
        return tf_opt.get_cosine_with_hard_restarts_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=total, num_cycles=num_cycles, **kwargs)
    if name == "polynomial":
        return tf_opt.get_polynomial_decay_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=total,
            power=getattr(args, "lr_scheduler_power", 1.0), **kwargs)
    if name == "cosine_with_min_lr":
        return tf_opt.get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=total, num_cycles=num_cycles / 2,
            min_lr_rate=min_lr_ratio if min_lr_ratio is not None else 0.0, **kwargs)
    if name == "warmup_stable_decay":
        return tf_opt.get_wsd_schedule(
            optimizer, num_warmup_steps=warmup, num_decay_steps=decay, num_training_steps=total,
            num_cycles=num_cycles / 2, min_lr_ratio=min_lr_ratio or 0.0, **kwargs)
    if name == "linear":
        return tf_opt.get_linear_schedule_with_warmup(optimizer, warmup, total, **kwargs)
    if name == "cosine":
        return tf_opt.get_cosine_schedule_with_warmup(optimizer, warmup, total, **kwargs)
    raise UserError(f"--lr_scheduler {name!r} is unknown (choices: {', '.join(SCHEDULER_NAMES)})")
