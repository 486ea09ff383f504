"""Command-line options for choosing the base model and for saving full models (sd-scripts names)."""

from __future__ import annotations

import argparse
from typing import Sequence

from library.errors import UserError

FULL_MODEL_FORMATS = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")
SAVE_PRECISIONS = ("float", "fp16", "bf16")
MAX_TOKEN_LENGTHS = (75, 150, 225)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pretrained_model_name_or_path``, ``--v2``, ``--v_parameterization``, ``--vae``, tokenizer and
    text-encoder options."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="base model: a diffusers folder, a .safetensors / .ckpt Stable Diffusion checkpoint, "
        "or a Hugging Face model id that is already in the local cache",
    )
    group.add_argument("--v2", action="store_true", help="the base model is Stable Diffusion 2.x")
    group.add_argument(
        "--v_parameterization",
        action="store_true",
        help="train with v-prediction (SD2.x 768-v models such as stable-diffusion-2 / 768-v-ema.ckpt)",
    )
    group.add_argument(
        "--vae",
        type=str,
        default=None,
        help="use this VAE instead of the model's: a .safetensors/.ckpt/.pt/.bin file or a diffusers folder",
    )
    group.add_argument(
        "--tokenizer_cache_dir",
        type=str,
        default=None,
        help="folder with tokenizer copies for offline use (see docs/models.md)",
    )
    group.add_argument(
        "--max_token_length",
        type=int,
        default=None,
        choices=MAX_TOKEN_LENGTHS,
        help="caption length in tokens: 75 (default), 150 or 225 (split into 75-token windows)",
    )
    group.add_argument(
        "--clip_skip",
        type=_positive_int,
        default=None,
        help="use the output of the k-th last text encoder layer (2 = penultimate)",
    )
    group.add_argument(
        "--lowram",
        action="store_true",
        help="accepted for compatibility; loading never keeps a second copy of the weights",
    )
    group.add_argument(
        "--highvram",
        action="store_true",
        help="accepted for compatibility; no effect here",
    )


def add_save_model_arguments(
    parser: argparse.ArgumentParser,
    choices: Sequence[str] = FULL_MODEL_FORMATS,
    default: str | None = None,
) -> None:
    """``--save_model_as`` (with the caller's ``choices``: full models or LoRA files) and ``--save_precision``."""
    group = parser.add_argument_group("saving")
    group.add_argument(
        "--save_model_as",
        type=str,
        default=default,
        choices=list(choices),
        help=f"format of the saved model ({', '.join(choices)})",
    )
    group.add_argument(
        "--save_precision",
        type=str,
        default=None,
        choices=list(SAVE_PRECISIONS),
        help="precision of the saved weights (float, fp16, bf16); default: as trained",
    )


def parse_max_token_length(value: int | None) -> int | None:
    """``None`` and 75 both mean a single 77-token window."""
    if value is None or value == 75:
        return None
    if value not in MAX_TOKEN_LENGTHS:
        raise UserError(f"--max_token_length {value} is not supported: use 75, 150 or 225")
    return value
