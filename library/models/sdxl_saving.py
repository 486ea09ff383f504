"""Saving whole SDXL models: one file in the ``sd_xl_base_1.0`` layout (``safetensors`` / ``ckpt``) or a
diffusers folder, written atomically like SD1.x models (``library.models.saving``)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from library.io_utils import atomic_save_file, match_umask, replace_folder
from library.models import ldm_conversion as conv
from library.models.architecture import ARCHITECTURE_METADATA_KEY
from library.models.saving import (
    _SUFFIX,
    SAVE_FORMATS,
    _cast,
    _umask,
    _unwrap,
    _write_tokenizer,
    _write_weights,
)
from library.models.sdxl_single_file import sdxl_architecture_metadata, sdxl_ldm_state_dict
from library.models.tiny_sdxl import write_sdxl_model_index


def save_sdxl_model(path: str | Path, models, *, fmt: str, dtype: torch.dtype | None = None,
                    metadata: dict[str, str] | None = None, epoch: int = 0, global_step: int = 0) -> Path:
    """Save the SDXL ``models`` to ``path`` as ``fmt`` (see ``library.models.saving.save_sd_model``)."""
    if fmt not in SAVE_FORMATS:
        raise ValueError(f"unknown model format {fmt!r}; use one of {', '.join(SAVE_FORMATS)}")
    path = Path(path)
    unet, tes = _unwrap(models.unet), [_unwrap(te) for te in models.text_encoders]
    arch = sdxl_architecture_metadata(unet, models.vae, tes)
    if fmt in _SUFFIX:
        if path.suffix != _SUFFIX[fmt]:
            raise ValueError(f"{path}: a {fmt} model file must end with {_SUFFIX[fmt]}")
        tensors = _cast(sdxl_ldm_state_dict(unet, models.vae, tes), dtype)
        if fmt == "safetensors":
            meta = {**(metadata or {}), ARCHITECTURE_METADATA_KEY: arch}
            atomic_save_file(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        else:
            payload = {"state_dict": tensors, "epoch": epoch, "global_step": global_step,
                       ARCHITECTURE_METADATA_KEY: arch}
            atomic_save_file(path, lambda tmp: torch.save(payload, tmp))
        return path
    _save_folder(path, models, unet, tes, dtype, safetensors=fmt == "diffusers_safetensors")
    return path


def _save_folder(path: Path, models, unet, tes, dtype, safetensors: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())
        for name, module in (("unet", unet), ("vae", models.vae)):
            (tmp / name).mkdir()
            module.save_config(str(tmp / name))
            _write_weights(tmp / name, "diffusion_pytorch_model", _cast(module.state_dict(), dtype), safetensors)
        for name, te, tokenizer in zip(("text_encoder", "text_encoder_2"), tes, models.tokenizers):
            (tmp / name).mkdir()
            te.config.save_pretrained(str(tmp / name))
            weights = _cast(te.state_dict(), dtype)
            projection = {k: weights.pop(k) for k in [k for k in weights if k.startswith("text_projection.")]}
            out = {"text_model." + k: v for k, v in conv.strip_text_model_prefix(weights).items()}
            out.pop("text_model.embeddings.position_ids", None)
            _write_weights(tmp / name, "model" if safetensors else "pytorch_model", {**out, **projection},
                           safetensors)
            _write_tokenizer(tokenizer, tmp / name.replace("text_encoder", "tokenizer"))
        scheduler = models.noise_scheduler()
        scheduler.register_to_config(steps_offset=1)
        scheduler.save_config(str(tmp / "scheduler"))
        write_sdxl_model_index(tmp)
        match_umask(tmp)
        replace_folder(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
