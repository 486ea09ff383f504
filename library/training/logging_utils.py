"""Watching a run: the moving-average loss, tracker (TensorBoard / wandb) setup and the console summary."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


class LossRecorder:
    """Loss per position in the epoch; ``average`` is the mean over the last epoch's worth of steps
    (sd-scripts' ``loss/average``), ``epoch_average`` the mean over the current epoch."""

    def __init__(self) -> None:
        self._by_position: list[float] = []
        self._epoch_sum = 0.0
        self._epoch_count = 0
        self._total = 0.0

    def add(self, position: int, loss: float) -> None:
        if position < len(self._by_position):
            self._total -= self._by_position[position]
            self._by_position[position] = loss
        else:
            self._by_position.append(loss)
        self._total += loss
        self._epoch_sum += loss
        self._epoch_count += 1

    def start_epoch(self) -> None:
        self._epoch_sum = 0.0
        self._epoch_count = 0

    @property
    def average(self) -> float:
        return self._total / max(len(self._by_position), 1)

    @property
    def epoch_average(self) -> float:
        return self._epoch_sum / max(self._epoch_count, 1)


def tracker_settings(args: argparse.Namespace, default_name: str) -> tuple[list[str] | None, str | None]:
    """``(log_with, project_dir)`` for ``Accelerator``: TensorBoard in
    ``logging_dir/<log_prefix><YYYYmmddHHMMSS>`` when ``--logging_dir`` is set."""
    log_with = args.log_with
    if log_with is None and args.logging_dir is not None:
        log_with = "tensorboard"
    if log_with is None:
        return None, None
    trackers = ["tensorboard", "wandb"] if log_with == "all" else [log_with]
    project_dir = None
    if args.logging_dir is not None:
        stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
        project_dir = str(Path(args.logging_dir) / f"{args.log_prefix or ''}{stamp}")
    return trackers, project_dir


def loggable_config(args: argparse.Namespace) -> dict[str, Any]:
    """Run options for the tracker's config: scalars only, without paths, tokens or keys."""
    hidden = ("dir", "path", "file", "token", "key", "config", "resume", "weights", "prompts")
    config = {}
    for key, value in sorted(vars(args).items()):
        if any(h in key for h in hidden):
            continue
        if isinstance(value, (int, float, str, bool)):
            config[key] = value
    return config


def describe_lr_groups(names: list[str], lrs: list[float]) -> dict[str, float]:
    """``lr/<name>`` entries of the current learning rates."""
    return {f"lr/{name}": lr for name, lr in zip(names, lrs)}
