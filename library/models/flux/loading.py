"""Loading FLUX.1: the files people download (each given separately) or a diffusers ``FluxPipeline`` folder.

:func:`component_problems` checks every file from its header before anything loads (a T5 file given as
``--clip_l``, an SDXL file given as the model, a missing ``--ae``); :func:`load_flux_models` then loads
strictly, frozen components in the run's weight dtype.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Collection

import torch

from library.errors import UserError
from library.models.flux.conversion import FluxArchitecture, bfl_to_diffusers, layout_of
from library.models.t5 import infer_t5_config, is_t5_encoder, load_t5_tokenizer
from library.models.weights import build_with_weights, read_weights, safetensors_keys

CLIP_MARKER = "embeddings.token_embedding.weight"


def describe_file(keys: Collection[str]) -> str:
    """What a weights file holds, from its tensor names."""
    names = set(keys)
    if layout_of(names) is not None:
        return "a FLUX transformer"
    if is_t5_encoder(names):
        return "a T5 text encoder"
    if CLIP_MARKER in names or f"text_model.{CLIP_MARKER}" in names:
        return "a CLIP text encoder"
    if any(k.startswith(("encoder.down.", "encoder.down_blocks.")) for k in names):
        return "an autoencoder (VAE/AE)"
    if any(k.startswith("model.diffusion_model.input_blocks.") for k in names):
        return "a Stable Diffusion / SDXL checkpoint"
    return "not a model part this script knows"


def _check_file(option: str, value: str | None, expected: str, problems: list[str]) -> set[str] | None:
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        problems.append(f"{option} {value}: not found, or not a .safetensors file")
        return None
    try:
        keys = set(safetensors_keys(path))
    except UserError as err:
        problems.append(f"{option} {err.message}")
        return None
    kind = describe_file(keys)
    if kind != expected:
        problems.append(f"{option} {path}: this file is {kind}, not {expected}; give {option} the {expected} file")
        return None
    return keys


def component_problems(args: argparse.Namespace, source: Path) -> list[str]:
    """Problems with ``--clip_l``, ``--t5xxl``, ``--ae`` (required unless the model is a diffusers folder)."""
    problems: list[str] = []
    folder = source.is_dir()
    for option, attr, expected in (("--clip_l", "clip_l", "a CLIP text encoder"),
                                   ("--t5xxl", "t5xxl", "a T5 text encoder"),
                                   ("--ae", "ae", "an autoencoder (VAE/AE)")):
        value = getattr(args, attr, None)
        if not value and not folder:
            problems.append(f"{option} is missing: a FLUX single file holds only the transformer; give {option} "
                            f"with {expected} file (e.g. {attr}.safetensors)")
        keys = _check_file(option, value, expected, problems)
        if attr == "ae" and keys is not None:
            with_prefix = {k for k in keys if k.endswith("encoder.conv_out.weight")}
            if not with_prefix:
                problems.append(f"--ae {value}: no encoder.conv_out weight; is the file complete?")
    return problems


def _load_file(path: str) -> dict[str, torch.Tensor]:
    return read_weights(Path(path).expanduser())[0]


def _cast(dtype: torch.dtype) -> Callable[[dict, set], dict]:
    def adapt(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return adapt


def load_transformer(source: Path, dtype: torch.dtype) -> Any:
    from diffusers import FluxTransformer2DModel

    if source.is_dir():
        return FluxTransformer2DModel.from_pretrained(source / "transformer", torch_dtype=dtype)
    state = _load_file(str(source))
    state = bfl_to_diffusers(state) if layout_of(state) == "bfl" else state
    arch = _architecture_of_diffusers(state)
    return build_with_weights(lambda: FluxTransformer2DModel(**arch.diffusers_config()), state, str(source),
                              dtype=dtype, adapt=_cast(dtype))


def _architecture_of_diffusers(state: dict[str, torch.Tensor]) -> FluxArchitecture:
    """Sizes of diffusers-named FLUX weights (the inverse view of ``read_architecture``)."""
    hidden, in_channels = state["x_embedder.weight"].shape
    head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    count = lambda prefix: len({k.split(".")[1] for k in state if k.startswith(prefix)})  # noqa: E731
    return FluxArchitecture(
        hidden_size=hidden, num_heads=hidden // head_dim, depth=count("transformer_blocks."),
        depth_single=count("single_transformer_blocks."), in_channels=in_channels,
        out_channels=state["proj_out.weight"].shape[0], context_in_dim=state["context_embedder.weight"].shape[1],
        vec_in_dim=state["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        mlp_hidden=state["transformer_blocks.0.ff.net.0.proj.weight"].shape[0],
        guidance_embed="time_text_embed.guidance_embedder.linear_1.weight" in state,
    )


def load_clip_l(path: str, dtype: torch.dtype) -> Any:
    """CLIP-L from ``clip_l.safetensors`` (with or without ``text_model.``), config from the shapes."""
    from transformers import CLIPTextModel

    from library.models.architecture import infer_text_config
    from library.models.families import sd_family
    from library.models.ldm_conversion import strip_text_model_prefix

    bare = strip_text_model_prefix(_load_file(path))
    bare.pop("embeddings.position_ids", None)
    config = infer_text_config(bare, sd_family(), {})
    state = {"text_model." + k: v for k, v in bare.items()} if _has_text_model(config) else bare
    return build_with_weights(lambda: CLIPTextModel(config), state, path, dtype=dtype, adapt=_cast(dtype))


def _has_text_model(config: Any) -> bool:
    from accelerate import init_empty_weights
    from transformers import CLIPTextModel

    with init_empty_weights():
        return any(k.startswith("text_model.") for k in CLIPTextModel(config).state_dict())


def load_t5(path: str, dtype: torch.dtype) -> Any:
    """T5 encoder from ``t5xxl_*.safetensors`` (fp16/bf16/fp8 stored), config from the shapes."""
    from transformers import T5EncoderModel

    state = _load_file(path)
    state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])  # tied; files keep one of them
    state.setdefault("shared.weight", state["encoder.embed_tokens.weight"])
    config = infer_t5_config({k: tuple(v.shape) for k, v in state.items()})
    model = build_with_weights(lambda: T5EncoderModel(config), state, path, dtype=dtype, adapt=_cast(dtype))
    model.tie_weights()
    return model


def load_ae(path: str, dtype: torch.dtype) -> Any:
    """The 16-channel FLUX AE from ``ae.safetensors`` (LDM names), with FLUX's scale and shift."""
    from diffusers import AutoencoderKL

    from library.models.architecture import infer_vae_config
    from library.models.families.flux import FLUX_LATENT_SCALE, FLUX_LATENT_SHIFT, flux_family
    from library.models.ldm_conversion import is_ldm_vae, vae_ldm_to_diffusers

    state = _load_file(path)
    state = vae_ldm_to_diffusers(state) if is_ldm_vae(state) else state
    config = infer_vae_config(state, flux_family("dev"), {})
    config.update(scaling_factor=FLUX_LATENT_SCALE, shift_factor=FLUX_LATENT_SHIFT,
                  use_quant_conv="quant_conv.weight" in state, use_post_quant_conv="post_quant_conv.weight" in state)
    return build_with_weights(lambda: AutoencoderKL.from_config(config), state, path, dtype=dtype, adapt=_cast(dtype))


def load_clip_tokenizer(folder: Path | None, cache_dir: str | None) -> Any:
    """CLIP-L's tokenizer: the model folder, --tokenizer_cache_dir, the HF cache, else the bundled BPE."""
    import tempfile

    from transformers import CLIPTokenizer

    from library.models.families import sd_family
    from library.models.tokenizers import load_tokenizer
    from library.models.tiny import write_clip_tokenizer

    try:
        return load_tokenizer(sd_family(), model_dir=folder, cache_dir=cache_dir)
    except UserError:
        with tempfile.TemporaryDirectory() as tmp:  # the same vocabulary, shipped with the toolkit
            return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(Path(tmp) / "clip")), local_files_only=True)


def load_flux_models(args: argparse.Namespace, family: Any, *, device: Any) -> Any:
    """Every FLUX component as :class:`library.models.loading.SDModels` (``unet`` is the transformer,
    ``vae`` the AE, ``text_encoders`` ``[CLIP-L, T5]``), frozen parts in the run's weight dtype."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, T5EncoderModel

    from library.models.loading import SDModels, resolve_model_path
    from library.precision import dtype_of

    dtype = dtype_of(args.mixed_precision, torch.float32)
    source = resolve_model_path(args.pretrained_model_name_or_path)
    folder = source if source.is_dir() else None
    transformer = load_transformer(source, dtype)
    clip = (load_clip_l(args.clip_l, dtype) if args.clip_l
            else CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype))
    t5 = (load_t5(args.t5xxl, dtype) if args.t5xxl
          else T5EncoderModel.from_pretrained(folder / "text_encoder_2", torch_dtype=dtype))
    ae = load_ae(args.ae, dtype) if args.ae else AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype)
    tokenizers = [load_clip_tokenizer(folder, args.tokenizer_cache_dir),
                  load_t5_tokenizer(model_dir=folder, cache_dir=args.tokenizer_cache_dir)]
    if len(tokenizers[1]) > t5.config.vocab_size:
        raise UserError(f"the T5 tokenizer has {len(tokenizers[1])} tokens but the T5 model only "
                        f"{t5.config.vocab_size}: they do not belong together")
    return SDModels(family=family, unet=transformer.to(device), vae=ae.to(device),
                    text_encoders=[clip.to(device), t5.to(device)], tokenizers=tokenizers, source=str(source),
                    vae_source=args.ae)
