"""Command-line options of the trained network (``--network_*``, LoRA learning rates, LoRA file saving) and the
parsing of ``--network_args``. Names and defaults are those of sd-scripts' ``train_network.py``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from library.errors import UserError

DEFAULT_NETWORK_MODULE = "networks.lora"


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the network options to ``parser`` (call before the training group, which skips options defined here)."""
    g = parser.add_argument_group("network")
    g.add_argument("--network_module", type=str, default=DEFAULT_NETWORK_MODULE,
                   help="module that builds the network (kohya interface), e.g. networks.lora or lycoris.kohya")
    g.add_argument("--network_dim", type=int, default=None, help="LoRA rank (networks.lora default: 4)")
    g.add_argument("--network_alpha", type=float, default=1,
                   help="LoRA alpha; the update is scaled by alpha / rank (default 1; same as rank = no scaling)")
    g.add_argument("--network_dropout", type=float, default=None,
                   help="dropout probability on the LoRA down-projection output during training")
    g.add_argument("--network_args", type=str, default=None, nargs="*",
                   help="key=value arguments of the network module, e.g. conv_dim=4 conv_alpha=1")
    g.add_argument("--network_weights", type=str, default=None, help="LoRA file to start training from")
    g.add_argument("--dim_from_weights", action="store_true",
                   help="take the ranks and alphas from --network_weights instead of --network_dim/--network_args")
    g.add_argument("--network_train_unet_only", action="store_true", help="train only the UNet LoRA modules")
    g.add_argument("--network_train_text_encoder_only", action="store_true",
                   help="train only the text encoder LoRA modules")
    g.add_argument("--unet_lr", type=float, default=None, help="learning rate of the UNet modules")
    g.add_argument("--text_encoder_lr", type=float, default=None, nargs="*",
                   help="learning rate of the text encoder modules (one value per text encoder allowed)")
    g.add_argument("--scale_weight_norms", type=float, default=None,
                   help="max norm of each module's weight update (max-norm regularization), e.g. 1.0")
    g.add_argument("--base_weights", type=str, default=None, nargs="*",
                   help="LoRA files merged into the base model before training")
    g.add_argument("--base_weights_multiplier", type=float, default=None, nargs="*",
                   help="multiplier of each --base_weights file (default 1.0 each)")
    g.add_argument("--no_metadata", action="store_true",
                   help="write only the metadata needed to use the file (network, dim, alpha, base model, modelspec)")
    g.add_argument("--training_comment", type=str, default=None, help="free text stored as ss_training_comment")
    g.add_argument("--save_model_as", type=str, default="safetensors", choices=(None, "ckpt", "pt", "safetensors"),
                   help="format of the saved LoRA file (default safetensors)")
    for key in ("title", "author", "description", "license", "tags"):
        g.add_argument(f"--metadata_{key}", type=str, default=None, help=f"modelspec.{key} of the saved file")


def parse_network_args(items: list[str] | None, network_module: str = DEFAULT_NETWORK_MODULE) -> dict[str, str]:
    """``["conv_dim=4", ...]`` -> ``{"conv_dim": "4"}`` (split on the first ``=``).

    For ``networks.lora`` the keys and values are validated too (unknown keys with a "did you mean"), so mistakes
    show before any model loads; other modules get the dict unchecked.
    """
    result: dict[str, str] = {}
    problems = []
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"{item!r} is not key=value (e.g. conv_dim=4)")
        elif key in result:
            problems.append(f"{key!r} is given twice ({result[key]!r} and {value.strip()!r})")
        else:
            result[key] = value.strip()
    if network_module == DEFAULT_NETWORK_MODULE:
        from networks.lora_options import NETWORK_ARGS, parse_network_kwargs

        known = {k: v for k, v in result.items() if k in NETWORK_ARGS}
        # unknown keys first, then the values of the known ones: every problem is reported at once
        for given in (result, known) if len(known) < len(result) else (result,):
            try:
                parse_network_kwargs(given, layout=None)  # counts per block: Recipe.family_problems
            except UserError as err:
                problems += err.problems or [err.message]
    if problems:
        raise UserError.from_problems("--network_args", problems)
    return result


def network_option_problems(args: argparse.Namespace) -> list[str]:
    """Problems among the network options that can be found before any model loads."""

    def g(name: str) -> Any:
        return getattr(args, name, None)

    problems = []
    if g("network_train_unet_only") and g("network_train_text_encoder_only"):
        problems.append("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    if g("dim_from_weights") and not g("network_weights"):
        problems.append("--dim_from_weights needs --network_weights (the file to take the ranks from)")
    if g("network_weights") and not Path(g("network_weights")).is_file():
        problems.append(f"--network_weights {g('network_weights')}: no such file")
    for path in g("base_weights") or []:
        if not Path(path).is_file():
            problems.append(f"--base_weights {path}: no such file")
    multipliers = g("base_weights_multiplier")
    if multipliers and len(multipliers) != len(g("base_weights") or []):
        problems.append(
            f"--base_weights_multiplier has {len(multipliers)} values for {len(g('base_weights') or [])} "
            "--base_weights files: give one per file (or none for 1.0 each)"
        )
    if g("network_dropout") is not None and not 0 <= g("network_dropout") < 1:
        problems.append(f"--network_dropout must be in [0, 1) (got {g('network_dropout')})")
    if g("scale_weight_norms") is not None and g("scale_weight_norms") <= 0:
        problems.append(f"--scale_weight_norms must be > 0 (got {g('scale_weight_norms')})")
    if g("network_dim") is not None and g("network_dim") < 1:
        problems.append(f"--network_dim must be >= 1 (got {g('network_dim')})")
    try:
        parse_network_args(g("network_args"), g("network_module") or DEFAULT_NETWORK_MODULE)
    except UserError as err:
        problems += err.items()
    return problems
