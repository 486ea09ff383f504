"""The command line of the training scripts: the same option groups, plus the recipe's own group."""

from __future__ import annotations

import argparse
from typing import Callable

from library.cli import ArgumentParser
from library.config.arguments import SUPPORT_BY_SCRIPT, add_config_file_arguments, add_dataset_arguments
from library.config.params import DatasetSupport
from library.models.arguments import add_model_arguments
from library.training.arguments import add_training_arguments
from library.training.losses import add_loss_arguments
from library.training.noise import add_noise_arguments
from library.training.optimizers import add_optimizer_arguments
from library.training.sampling import add_sampling_arguments
from library.training.schedulers import add_scheduler_arguments


def _dataset_options(support: DatasetSupport) -> set[str]:
    parser = argparse.ArgumentParser(add_help=False)
    add_dataset_arguments(parser, support)
    return {o for o in parser._option_string_actions if o.startswith("--")}


def _other_script_hints(support: DatasetSupport) -> dict[str, str]:
    """For dataset options this script lacks: which scripts take them (e.g. --in_json for train_db.py)."""
    own = _dataset_options(support)
    takers: dict[str, list[str]] = {}
    for script, other in SUPPORT_BY_SCRIPT.items():
        for option in _dataset_options(other) - own:
            takers.setdefault(option, []).append(script)
    return {
        option: f"{support.script} does not take this dataset style; it is an option of {' and '.join(scripts)}"
        for option, scripts in takers.items()
    }


def build_training_parser(
    *, prog: str, description: str, support: DatasetSupport,
    add_recipe_arguments: Callable[[argparse.ArgumentParser], None],
) -> ArgumentParser:
    """Config file, model, dataset, recipe, noise, loss, optimizer, scheduler, sampling and loop options."""
    parser = ArgumentParser(prog=prog, description=description, hints=_other_script_hints(support))
    add_config_file_arguments(parser)
    add_model_arguments(parser)
    add_dataset_arguments(parser, support)
    add_recipe_arguments(parser)
    add_noise_arguments(parser)
    add_loss_arguments(parser)
    add_optimizer_arguments(parser)
    add_scheduler_arguments(parser)
    add_sampling_arguments(parser)
    add_training_arguments(parser)
    return parser
