"""Loading Lumina Image 2.0: the files people download (``--pretrained_model_name_or_path`` the Next-DiT file,
``--gemma2``, ``--ae``) or a diffusers ``Lumina2Pipeline`` folder (``--gemma2`` / ``--ae`` replace its parts).

:func:`component_problems` checks every file from its header before anything loads (a T5 file given as
``--gemma2``, a missing ``--ae``); :func:`load_lumina_models` then loads strictly, frozen parts in the run's
weight dtype.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Collection

import torch

from library.errors import UserError
from library.models.lumina.conversion import layout_of, nextdit_to_diffusers, read_architecture, strip_prefix
from library.models.lumina.gemma import is_gemma2, load_gemma2, load_gemma_tokenizer
from library.models.weights import build_with_weights, read_weights, safetensors_keys

GEMMA2 = "a Gemma2 text encoder"
AE = "an autoencoder (VAE/AE)"


def describe_file(keys: Collection[str]) -> str:
    """What a weights file holds, from its tensor names."""
    from library.models.flux.loading import describe_file as describe_flux_file

    if layout_of(keys) is not None:
        return "a Lumina 2 (Next-DiT) transformer"
    if is_gemma2(keys):
        return GEMMA2
    return describe_flux_file(keys)


def _file_problem(option: str, value: str, expected: str) -> str | None:
    path = Path(value).expanduser()
    if expected == GEMMA2 and path.is_dir():
        return None if (path / "config.json").is_file() else (
            f"{option} {value}: this folder has no config.json; give the Gemma2 folder (config.json and weights) "
            "or the gemma_2_2b .safetensors file")
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return f"{option} {value}: not found, or not a .safetensors file"
    try:
        keys = safetensors_keys(path)
    except UserError as err:
        return f"{option} {err.message}"
    kind = describe_file(keys)
    if kind != expected:
        what = ("the Gemma2 2B file (gemma_2_2b_fp16.safetensors)" if expected == GEMMA2
                else "the FLUX AE (ae.safetensors)")
        return f"{option} {path}: this file is {kind}, not {expected}; give {option} {what}"
    if expected == AE and not any(k.endswith("encoder.conv_out.weight") for k in keys):
        return f"{option} {value}: no encoder.conv_out weight; is the file complete?"
    return None


def component_problems(args: argparse.Namespace, source: Path) -> list[str]:
    """Problems with ``--gemma2`` and ``--ae`` (required unless the model is a diffusers folder)."""
    problems: list[str] = []
    for option, attr, expected in (("--gemma2", "gemma2", GEMMA2), ("--ae", "ae", AE)):
        value = getattr(args, attr, None)
        if not value:
            if not source.is_dir():
                problems.append(f"{option} is missing: a Lumina single file holds only the transformer; give "
                                f"{option} with {expected} file")
            continue
        problem = _file_problem(option, value, expected)
        if problem:
            problems.append(problem)
    return problems


def main_layer_count(source: Path, keys: Collection[str] | None) -> int:
    """How many main ``layers`` the transformer has, from the folder's config or the file's tensor names."""
    if source.is_dir():
        return int(json.loads((source / "transformer" / "config.json").read_text(encoding="utf-8"))["num_layers"])
    return len({k.split(".")[1] for k in strip_prefix(keys or ()) if k.startswith("layers.")})


def load_transformer(source: Path, dtype: torch.dtype) -> Any:
    """``Lumina2Transformer2DModel`` from a diffusers folder or a single file (either layout)."""
    from diffusers import Lumina2Transformer2DModel

    if source.is_dir():
        return Lumina2Transformer2DModel.from_pretrained(source / "transformer", torch_dtype=dtype)
    state = read_weights(source)[0]
    state = nextdit_to_diffusers(state) if layout_of(state) == "nextdit" else state
    arch = read_architecture({k: tuple(v.shape) for k, v in state.items()})
    if arch.problems():
        raise UserError(f"{source}: {'; '.join(arch.problems())}")

    def adapt(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}

    return build_with_weights(lambda: Lumina2Transformer2DModel(**arch.diffusers_config()), state, str(source),
                              dtype=dtype, adapt=adapt)


def load_lumina_models(args: argparse.Namespace, family: Any, *, device: Any) -> Any:
    """Every Lumina component as :class:`library.models.loading.SDModels` (``unet`` is the transformer, ``vae``
    the FLUX AE, ``text_encoders`` ``[Gemma2]``), frozen parts in the run's weight dtype."""
    from diffusers import AutoencoderKL

    from library.models.flux.loading import load_ae
    from library.models.loading import SDModels, resolve_model_path
    from library.precision import dtype_of

    dtype = dtype_of(args.mixed_precision, torch.float32)
    source = resolve_model_path(args.pretrained_model_name_or_path)
    folder = source if source.is_dir() else None
    transformer = load_transformer(source, dtype)
    gemma = load_gemma2(args.gemma2 or folder / "text_encoder", dtype)
    ae = load_ae(args.ae, dtype) if args.ae else AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype)
    tokenizer = load_gemma_tokenizer(args.gemma2, folder, args.tokenizer_cache_dir)
    if len(tokenizer) > gemma.config.vocab_size:
        raise UserError(f"the Gemma tokenizer has {len(tokenizer)} tokens but the Gemma2 model only "
                        f"{gemma.config.vocab_size}: they do not belong together")
    if transformer.config.cap_feat_dim != gemma.config.hidden_size:
        raise UserError(f"the Lumina transformer reads {transformer.config.cap_feat_dim}-wide text features but the "
                        f"Gemma2 model gives {gemma.config.hidden_size}: --gemma2 is not this model's text encoder")
    return SDModels(family=family, unet=transformer.to(device), vae=ae.to(device), text_encoders=[gemma.to(device)],
                    tokenizers=[tokenizer], source=str(source), vae_source=args.ae)
