"""What every LoRA training script (``train_network.py`` and its per-family siblings) does: build the parser of the
LoRA options plus the family's own, then load the run configuration and train. A script names only what differs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from library.cli import ArgumentParser
from library.config.arguments import SUPPORT_TRAIN_NETWORK
from library.training.network_args import add_network_arguments
from library.training.parser import build_training_parser

if TYPE_CHECKING:
    from library.training.preparation import Run
    from library.training.recipes import Recipe


def build_lora_parser(*, prog: str, description: str,
                      add_family_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                      network_module: str | None = None) -> ArgumentParser:
    """The training parser with the LoRA options, then ``add_family_arguments``'s; ``network_module`` is the
    family's default ``--network_module``."""

    def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
        add_network_arguments(parser)
        if add_family_arguments is not None:
            add_family_arguments(parser)
        if network_module is not None:
            parser.set_defaults(network_module=network_module)

    return build_training_parser(prog=prog, description=description, support=SUPPORT_TRAIN_NETWORK,
                                 add_recipe_arguments=add_recipe_arguments)


def run_lora_script(parser: argparse.ArgumentParser, argv: list[str] | None,
                    recipe: Callable[[argparse.Namespace], Recipe], *, tracker_name: str, families: Sequence[str],
                    metadata_extras: Callable[[Run], dict[str, str]] | None = None) -> Path | None:
    """Apply ``--config_file``/``--output_config`` to ``argv`` and train a ``recipe(args)``; returns the final LoRA
    file (None with --debug_dataset or --output_config). ``metadata_extras(run)`` adds the family's keys to the
    LoRA metadata of every save."""
    from library.config.run_config import load_run_config
    from library.training.loop import run_training
    from library.training.lora_metadata import lora_metadata_for_run

    args = load_run_config(parser, argv)
    if args is None:
        return None

    def metadata(run: Run) -> dict[str, str]:
        return {**lora_metadata_for_run(run), **(metadata_extras(run) if metadata_extras is not None else {})}

    return run_training(args, recipe(args), SUPPORT_TRAIN_NETWORK, tracker_name=tracker_name, metadata=metadata,
                        families=families)
