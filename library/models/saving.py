"""Saving full SD1.x/SD2.x models: single files in the original (LDM) layout, or diffusers folders.

Writes are atomic: a file or folder appears complete or not at all. The saver replaces whatever is at
``path``; choosing names that do not overwrite the user's files is the caller's job (the trainer checks its
output names before training starts). Nothing is downloaded: scheduler, tokenizer and ``model_index.json``
are written from what was loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from library.io_utils import atomic_save_file, match_umask, replace_folder
from library.models import ldm_conversion as conv
from library.models.architecture import ARCHITECTURE_METADATA_KEY, architecture_metadata
from library.models.families.sd import sd_variant
from library.models.loading import SDModels
from library.precision import DTYPES

SAVE_FORMATS = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")
_SUFFIX = {"ckpt": ".ckpt", "safetensors": ".safetensors"}


def write_model_index(folder: Path) -> None:
    """``model_index.json`` of an SD1/SD2 diffusers folder (no safety checker), so ``from_pretrained`` reads it."""
    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

def save_dtype(precision: str | None) -> torch.dtype | None:
    """``--save_precision`` (float | fp16 | bf16) as a dtype; ``None`` keeps the weights' own dtype."""
    if precision is None:
        return None
    if precision not in DTYPES:
        raise ValueError(f"unknown save precision {precision!r}; use float, fp16 or bf16")
    return DTYPES[precision]


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().to("cpu", dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
        for k, v in tensors.items()
    }


def _unwrap(module):
    """The module behind ``torch.compile`` (whose state-dict keys carry an ``_orig_mod.`` prefix)."""
    return getattr(module, "_orig_mod", module)


def ldm_state_dict(models: SDModels, *, unet=None, text_encoder=None) -> dict[str, torch.Tensor]:
    """All weights in the original single-file layout (``model.diffusion_model.*`` etc.)."""
    unet = unet if unet is not None else models.unet
    text_encoder = text_encoder if text_encoder is not None else models.text_encoders[0]
    out: dict[str, torch.Tensor] = {}
    for k, v in conv.unet_diffusers_to_ldm(unet.state_dict(), unet.config).items():
        out[conv.UNET_PREFIX + k] = v
    for k, v in conv.vae_diffusers_to_ldm(models.vae.state_dict()).items():
        out[conv.VAE_PREFIX + k] = v
    te = text_encoder.state_dict()
    if sd_variant(models.family).openclip:
        out.update({conv.OPENCLIP_PREFIX + k: v for k, v in conv.bare_to_openclip(te).items()})
    else:
        te = conv.clip_bare_to_ldm(te)
        te.pop("text_model.embeddings.position_ids", None)
        out.update({conv.CLIP_PREFIX + k: v for k, v in te.items()})
    return out


def save_sd_model(
    path: str | Path,
    models: SDModels,
    *,
    fmt: str,
    dtype: torch.dtype | None = None,
    unet=None,
    text_encoder=None,
    metadata: dict[str, str] | None = None,
    epoch: int = 0,
    global_step: int = 0,
) -> Path:
    """Save ``models`` (with ``unet`` / ``text_encoder`` replacing the loaded ones when given, e.g. the
    trained copies) to ``path`` as ``fmt``: ``safetensors`` / ``ckpt`` (one file, LDM layout) or
    ``diffusers`` (``.bin`` weights) / ``diffusers_safetensors`` (a folder). ``dtype`` None keeps each
    weight's dtype. ``metadata`` goes into a ``.safetensors`` header; ``epoch``/``global_step`` into a ``.ckpt``.
    """
    if fmt not in SAVE_FORMATS:
        raise ValueError(f"unknown model format {fmt!r}; use one of {', '.join(SAVE_FORMATS)}")
    path = Path(path)
    unet = _unwrap(unet if unet is not None else models.unet)
    text_encoder = _unwrap(text_encoder if text_encoder is not None else models.text_encoders[0])
    arch = architecture_metadata(unet.config, models.vae.config, text_encoder.config)
    if fmt in _SUFFIX:
        if path.suffix != _SUFFIX[fmt]:
            raise ValueError(f"{path}: a {fmt} model file must end with {_SUFFIX[fmt]}")
        tensors = _cast(ldm_state_dict(models, unet=unet, text_encoder=text_encoder), dtype)
        if fmt == "safetensors":
            meta = {**(metadata or {}), ARCHITECTURE_METADATA_KEY: arch}
            atomic_save_file(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        else:
            payload = {
                "state_dict": tensors,
                "epoch": epoch,
                "global_step": global_step,
                ARCHITECTURE_METADATA_KEY: arch,
            }
            atomic_save_file(path, lambda tmp: torch.save(payload, tmp))
        return path
    _save_diffusers(path, models, unet, text_encoder, dtype, safetensors=fmt == "diffusers_safetensors")
    return path


def _write_weights(folder: Path, stem: str, tensors: dict[str, torch.Tensor], safetensors: bool) -> None:
    if safetensors:
        save_file(tensors, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(tensors, folder / f"{stem}.bin")


def _write_tokenizer(tokenizer, folder: Path) -> None:
    """``save_pretrained`` plus ``vocab.json``/``merges.txt``, which transformers 4 needs for CLIP."""
    tokenizer.save_pretrained(str(folder))
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (folder / "vocab.json").write_text(json.dumps(spec["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


def _save_diffusers(path: Path, models: SDModels, unet, text_encoder, dtype, safetensors: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700); the model folder is the user's like any
        for name, module in (("unet", unet), ("vae", models.vae)):
            (tmp / name).mkdir()
            module.save_config(str(tmp / name))
            _write_weights(tmp / name, "diffusion_pytorch_model", _cast(module.state_dict(), dtype), safetensors)
        (tmp / "text_encoder").mkdir()
        text_encoder.config.save_pretrained(str(tmp / "text_encoder"))
        bare = conv.strip_text_model_prefix(_cast(text_encoder.state_dict(), dtype))
        te = {"text_model." + k: v for k, v in bare.items()}
        te.pop("text_model.embeddings.position_ids", None)
        _write_weights(tmp / "text_encoder", "model" if safetensors else "pytorch_model", te, safetensors)
        # steps_offset 1 as in the original SD scheduler configs (inference pipelines warn otherwise)
        scheduler = models.noise_scheduler()
        scheduler.register_to_config(steps_offset=1)
        scheduler.save_config(str(tmp / "scheduler"))
        _write_tokenizer(models.tokenizers[0], tmp / "tokenizer")
        write_model_index(tmp)
        match_umask(tmp)
        replace_folder(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
