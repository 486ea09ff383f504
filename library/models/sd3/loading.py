"""Loading SD3 / SD3.5: the single file (with or without the text encoders and VAE inside), the parts given
separately (``--clip_l``, ``--clip_g``, ``--t5xxl``, ``--vae``), or a diffusers ``StableDiffusion3Pipeline`` folder.

:func:`component_problems` checks every file from its header before anything loads (a FLUX file given as the
model, a T5 file given as ``--clip_g``, a part that is neither in the single file nor given); :func:`load_sd3_models`
then loads strictly: a part given separately replaces the single file's or the folder's.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Collection

import torch

from library.errors import UserError
from library.models.sd3.conversion import (
    SD3Architecture, architecture_of_diffusers, layout_of, parts_in_file, read_architecture, sai_to_diffusers,
    split_single_file,
)
from library.models.weights import build_with_weights, read_weights, safetensors_keys

SD3_LATENT_SCALE = 1.5305
SD3_LATENT_SHIFT = 0.0609
# (option, role in the single file, diffusers subfolder, what the file must be)
PARTS = (("--clip_l", "clip_l", "text_encoder", "a CLIP-L text encoder"),
         ("--clip_g", "clip_g", "text_encoder_2", "a CLIP-G text encoder"),
         ("--t5xxl", "t5xxl", "text_encoder_3", "a T5 text encoder"),
         ("--vae", "vae", "vae", "an autoencoder (VAE/AE)"))


def describe_file(keys: Collection[str]) -> str:
    """What a weights file holds, from its tensor names (SD3 parts first, then FLUX's list)."""
    from library.models.flux.loading import describe_file as describe_other

    names = set(keys)
    inside = parts_in_file(names)
    if "mmdit" in inside:
        return "an SD3 model" + (f" (with {', '.join(sorted(inside - {'mmdit'}))})" if len(inside) > 1 else "")
    if layout_of(names) == "diffusers":
        return "an SD3 transformer"
    if any(k.startswith("text_model.") and k.endswith("position_embedding.weight") for k in names) or \
            "embeddings.position_embedding.weight" in names:
        return "a CLIP text encoder"
    return describe_other(names)


# the hidden width of the full-size CLIPs tells a CLIP-L file (768) from a CLIP-G one (1280)
CLIP_WIDTHS = {768: "clip_l", 1280: "clip_g"}
# where each kind of file goes
_OPTION_OF = {"clip_l": "--clip_l", "clip_g": "--clip_g", "clip": "--clip_l or --clip_g", "t5xxl": "--t5xxl",
              "vae": "--vae", "sd3": "--pretrained_model_name_or_path"}


def _file_shapes(option: str, value: str, problems: list[str]) -> dict[str, tuple[int, ...]] | None:
    path = Path(value).expanduser()
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        problems.append(f"{option} {value}: not found, or not a .safetensors file")
        return None
    try:
        safetensors_keys(path)
    except UserError as err:
        problems.append(f"{option} {err.message}")
        return None
    return _header_shapes(path)


def part_of_file(shapes: dict[str, tuple[int, ...]]) -> tuple[str | None, str]:
    """(kind, description) of a weights file from its header: kind is ``clip_l`` / ``clip_g`` (a CLIP of the
    full-size width), ``clip`` (a CLIP of another width), ``t5xxl``, ``vae``, ``sd3`` or None."""
    what = describe_file(shapes)
    if what == "a CLIP text encoder":
        width = next((s[-1] for k, s in shapes.items() if k.endswith("position_embedding.weight")), None)
        kind = CLIP_WIDTHS.get(width) if width is not None else None
        if kind is None:
            return "clip", what
        return kind, f"a CLIP-{kind[-1].upper()} text encoder ({width} wide)"
    kinds = {"a T5 text encoder": "t5xxl", "an autoencoder (VAE/AE)": "vae"}
    return kinds.get(what, "sd3" if what.startswith("an SD3 model") else None), what


def _part_problem(option: str, role: str, value: str, shapes: dict[str, tuple[int, ...]], expected: str) -> str | None:
    """Why the file given as ``option`` cannot be its ``role`` (what it is, and the option it belongs to), or None."""
    kind, what = part_of_file(shapes)
    if kind == role or (kind == "clip" and role in ("clip_l", "clip_g")) or (
            role == "vae" and "vae" in parts_in_file(shapes)):
        return None
    goes = _OPTION_OF.get(kind) if kind is not None else None
    fix = (f"it belongs to {goes}; give {option} {expected} file" if goes else f"give {option} {expected} file")
    return f"{option} {value}: this file is {what}, not {expected}; {fix}"


def component_problems(args: argparse.Namespace, source: Path, keys: Collection[str] | None) -> list[str]:
    """Every problem with the model parts: each given file must hold its part (a CLIP-G file given as ``--clip_l``
    is named, with the option it belongs to), and each part must come from somewhere (given, inside the single
    file, or the diffusers folder)."""
    problems: list[str] = []
    inside = parts_in_file(keys) if keys is not None else set()
    for option, role, sub, expected in PARTS:
        value = getattr(args, role, None)
        if value:
            if role == "vae" and Path(value).expanduser().is_dir():
                continue
            shapes = _file_shapes(option, value, problems)
            problem = _part_problem(option, role, value, shapes, expected) if shapes is not None else None
            problems += [problem] if problem else []
        elif source.is_dir():
            if not (source / sub).is_dir():
                problems.append(f"{source}: the diffusers folder has no {sub}/; give {option} the {role} file")
        elif role not in inside:
            problems.append(f"{option} is missing: {source.name} does not hold the {role} weights; give {option} "
                            f"({role}.safetensors)")
    return problems


def _cast(dtype: torch.dtype) -> Any:
    def adapt(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return adapt


def build_transformer(state: dict[str, torch.Tensor], what: str, dtype: torch.dtype) -> Any:
    """``SD3Transformer2DModel`` from SAI or diffusers names (architecture from the shapes), strictly."""
    from diffusers import SD3Transformer2DModel

    if layout_of(state) == "sai":
        arch = read_architecture({k: v.shape for k, v in state.items()})
        try:
            state = sai_to_diffusers(state, arch)
        except KeyError as err:
            raise UserError(f"{what}: {err.args[0]}; is the file an SD3 / SD3.5 model?") from None
    else:
        arch = architecture_of_diffusers({k: v.shape for k, v in state.items()})
    return build_with_weights(lambda: SD3Transformer2DModel(**arch.diffusers_config()), state, what, dtype=dtype,
                              adapt=_cast(dtype))


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def transformer_architecture(source: Path) -> SD3Architecture:
    """The MMDiT's sizes from a single file's header, or from a diffusers folder's transformer headers."""
    from library.models.loading import _DIFFUSERS_WEIGHTS
    from library.models.weights import find_weights_file

    if source.is_dir():
        shapes: dict[str, tuple[int, ...]] = {}
        for file in find_weights_file(source / "transformer", _DIFFUSERS_WEIGHTS):
            shapes.update(_header_shapes(file))
        return architecture_of_diffusers(shapes)
    shapes = _header_shapes(source)
    if layout_of(shapes) == "sai":
        return read_architecture({k: v for k, v in shapes.items() if k.startswith(("model.diffusion_model.",
                                                                                   "joint_blocks."))
                                  or "." not in k or k.split(".")[0] in _SAI_ROOTS})
    return architecture_of_diffusers(shapes)


_SAI_ROOTS = {"x_embedder", "t_embedder", "y_embedder", "context_embedder", "final_layer", "pos_embed"}


def build_clip(state: dict[str, torch.Tensor], what: str, dtype: torch.dtype, *, big: bool) -> Any:
    """CLIP-L (``big=False``, quick GELU) or CLIP-G (GELU) as ``CLIPTextModelWithProjection``; a CLIP-L file
    without ``text_projection`` gets the identity, as sd-scripts does."""
    from transformers import CLIPTextModelWithProjection

    from library.models.architecture import infer_text_config
    from library.models.families import sd_family
    from library.models.ldm_conversion import strip_text_model_prefix

    projection = {k: v for k, v in state.items() if k.startswith("text_projection.")}
    bare = strip_text_model_prefix({k: v for k, v in state.items() if k not in projection})
    bare.pop("embeddings.position_ids", None)
    width = bare["embeddings.token_embedding.weight"].shape[1]
    if "text_projection.weight" not in projection:
        projection["text_projection.weight"] = torch.eye(width)
    config = infer_text_config(bare, sd_family(), {})
    config.hidden_act = "gelu" if big else "quick_gelu"
    config.projection_dim = projection["text_projection.weight"].shape[0]
    full = {**{"text_model." + k: v for k, v in bare.items()}, **projection}
    return build_with_weights(lambda: CLIPTextModelWithProjection(config), full, what, dtype=dtype, adapt=_cast(dtype))


def build_t5(state: dict[str, torch.Tensor], what: str, dtype: torch.dtype) -> Any:
    from transformers import T5EncoderModel

    from library.models.t5 import infer_t5_config

    state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])  # tied; files keep one of them
    state.setdefault("shared.weight", state["encoder.embed_tokens.weight"])
    config = infer_t5_config({k: tuple(v.shape) for k, v in state.items()})
    model = build_with_weights(lambda: T5EncoderModel(config), state, what, dtype=dtype, adapt=_cast(dtype))
    model.tie_weights()
    return model


def build_vae(state: dict[str, torch.Tensor], what: str, dtype: torch.dtype) -> Any:
    """The 16-channel SD3 VAE from LDM or diffusers names, with SD3's scale and shift."""
    from diffusers import AutoencoderKL

    from library.models.architecture import infer_vae_config
    from library.models.families import sd_family
    from library.models.ldm_conversion import is_ldm_vae, vae_ldm_to_diffusers

    state = vae_ldm_to_diffusers(state) if is_ldm_vae(state) else state
    config = infer_vae_config(state, sd_family(), {})
    config.update(scaling_factor=SD3_LATENT_SCALE, shift_factor=SD3_LATENT_SHIFT,
                  use_quant_conv="quant_conv.weight" in state, use_post_quant_conv="post_quant_conv.weight" in state)
    return build_with_weights(lambda: AutoencoderKL.from_config(config), state, what, dtype=dtype, adapt=_cast(dtype))


def _given(path: str, role: str) -> dict[str, torch.Tensor]:
    """A part given separately; a whole SD3 single file given as ``--vae``/``--clip_l`` gives that part."""
    state = read_weights(Path(path).expanduser())[0]
    if parts_in_file(state) - {"mmdit"} and role in parts_in_file(state):
        return split_single_file(state)[role]
    return state


def _folder_part(folder: Path, sub: str, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    classes = {"transformer": SD3Transformer2DModel, "text_encoder": CLIPTextModelWithProjection,
               "text_encoder_2": CLIPTextModelWithProjection, "text_encoder_3": T5EncoderModel, "vae": AutoencoderKL}
    return classes[sub].from_pretrained(str(folder / sub), torch_dtype=dtype)


def load_sd3_models(args: argparse.Namespace, family: Any, *, device: Any) -> Any:
    """Every SD3 component as :class:`library.models.loading.SDModels` (``unet`` is the MMDiT,
    ``text_encoders`` ``[CLIP-L, CLIP-G, T5]``), in the run's weight dtype."""
    from library.models.loading import SDModels, resolve_model_path
    from library.precision import dtype_of

    dtype = dtype_of(args.mixed_precision, torch.float32)
    source = resolve_model_path(args.pretrained_model_name_or_path)
    folder = source if source.is_dir() else None
    builders = {"clip_l": lambda s, w: build_clip(s, w, dtype, big=False),
                "clip_g": lambda s, w: build_clip(s, w, dtype, big=True),
                "t5xxl": lambda s, w: build_t5(s, w, dtype), "vae": lambda s, w: build_vae(s, w, dtype)}
    loaded: dict[str, Any] = {}
    inside: dict[str, dict[str, torch.Tensor]] = {}
    if folder is None:
        inside = split_single_file(read_weights(source)[0])
        loaded["mmdit"] = build_transformer(inside.pop("mmdit"), str(source), dtype)
    else:
        loaded["mmdit"] = _folder_part(folder, "transformer", dtype)
    for option, role, sub, _ in PARTS:
        value = getattr(args, role, None)
        if role == "vae" and value and Path(value).expanduser().is_dir():
            from library.models.loading import load_vae

            loaded[role] = load_vae(value, family, dtype=dtype)
            loaded[role].register_to_config(scaling_factor=SD3_LATENT_SCALE, shift_factor=SD3_LATENT_SHIFT)
        elif value:
            loaded[role] = builders[role](_given(value, role), f"{option} {value}")
        elif folder is not None:
            loaded[role] = _folder_part(folder, sub, dtype)
        else:
            loaded[role] = builders[role](inside.pop(role), f"{source} ({role})")
    tokenizers = load_sd3_tokenizers(folder, args.tokenizer_cache_dir)
    t5 = loaded["t5xxl"]
    if len(tokenizers[2]) > t5.config.vocab_size:
        raise UserError(f"the T5 tokenizer has {len(tokenizers[2])} tokens but the T5 model only "
                        f"{t5.config.vocab_size}: they do not belong together")
    return SDModels(family=family, unet=loaded["mmdit"].to(device), vae=loaded["vae"].to(device),
                    text_encoders=[loaded[r].to(device) for r in ("clip_l", "clip_g", "t5xxl")],
                    tokenizers=tokenizers, source=str(source), vae_source=getattr(args, "vae", None))


def load_sd3_vae(source: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The VAE of an SD3 single file (``first_stage_model.*`` inside) or diffusers folder, as training loads it."""
    if source.is_dir():
        return _folder_part(source, "vae", dtype)
    parts = split_single_file(read_weights(source)[0])
    if "vae" not in parts:
        raise UserError(f"{source}: this SD3 file holds no VAE (first_stage_model.*); give the SD3 VAE file or a "
                        "single file that includes it")
    return build_vae(parts["vae"], f"{source} (vae)", dtype)


def load_sd3_tokenizers(folder: Path | None, cache_dir: str | None) -> list[Any]:
    """CLIP-L (pads with the end token), CLIP-G (pads with ``!``, id 0) and T5, all offline: the model folder's
    ``tokenizer``/``tokenizer_2``/``tokenizer_3``, ``--tokenizer_cache_dir``, the HF cache, then (CLIP) the
    bundled BPE."""
    from library.models.t5 import load_t5_tokenizer
    from library.models.tokenizers import SDXL_TOKENIZERS, load_clip_tokenizer

    clips = [load_clip_tokenizer(spec, model_dir=folder, cache_dir=cache_dir) for spec in SDXL_TOKENIZERS]
    t5_dir = folder / "tokenizer_3" if folder is not None and (folder / "tokenizer_3").is_dir() else folder
    return [*clips, load_t5_tokenizer(model_dir=t5_dir, cache_dir=cache_dir)]
