"""Loading Stable Diffusion 1.x/2.x models: diffusers folders, single-file checkpoints, cached Hub ids.

Everything is checked before weights are read: the path and its kind, then the family (``--v2``) against
what the checkpoint shows. Modules are built without random initialisation and filled strictly: a
missing or unexpected weight is an error, never a silently random layer.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.models import ldm_conversion as conv
from library.models.architecture import (
    ARCHITECTURE_METADATA_KEY,
    infer_text_config,
    infer_unet_config,
    infer_vae_config,
    parse_architecture_metadata,
)
from library.models.families import SD_SCHEDULE, ModelFamily
from library.models.families.sd import sd_variant
from library.models.metadata import file_hashes
from library.models.tokenizers import load_tokenizer
from library.models.weights import (
    SINGLE_FILE_SUFFIXES,
    build_with_weights,
    find_weights_file,
    read_weight_files,
    read_weights,
    safetensors_keys,
)

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model",)
_TRANSFORMERS_WEIGHTS = ("model", "pytorch_model")


@dataclass(eq=False)
class SDModels:
    """The loaded parts of an SD1.x/SD2.x model."""

    family: ModelFamily
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    source: str
    vae_source: str | None = None
    _hashes: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)

    def noise_scheduler(self):
        """A fresh ``DDPMScheduler`` with the SD training schedule and this family's prediction type."""
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self.family.scheduler_config, clip_sample=False,
                             prediction_type=self.family.prediction_type)

    @property
    def denoiser(self):
        """The model that predicts the noise (or velocity): the UNet of SD1.x/2.x/XL."""
        return self.unet

    @property
    def model_hashes(self) -> dict[str, str]:
        """``legacy`` (sd-scripts ``ss_sd_model_hash``) and ``sha256`` (``ss_new_sd_model_hash``) of the
        source file; empty for folders. Computed on first use (reading a large file takes seconds)."""
        return self._file_hashes(self.source)

    @property
    def vae_hashes(self) -> dict[str, str]:
        """The same hashes for a ``--vae`` file (sd-scripts ``ss_vae_hash`` / ``ss_new_vae_hash``); empty
        without ``--vae`` or for a folder."""
        return self._file_hashes(self.vae_source) if self.vae_source else {}

    def _file_hashes(self, source: str) -> dict[str, str]:
        if source not in self._hashes:
            if Path(source).is_file():
                legacy, sha256 = file_hashes(source)
                self._hashes[source] = {"legacy": legacy, "sha256": sha256}
            else:
                self._hashes[source] = {}
        return self._hashes[source]


# ------------------------------------------------------------------------------------------ resolving


def resolve_model_path(name: str | None) -> Path:
    """The local file or folder for ``--pretrained_model_name_or_path``, checked before anything loads.

    A Hub id is looked up in the local Hugging Face cache; it is downloaded only when the Hub is reachable
    and ``HF_HUB_OFFLINE`` is not set.
    """
    if not name:
        raise UserError(
            "--pretrained_model_name_or_path is required: a diffusers folder, a .safetensors/.ckpt file or a Hub id"
        )
    path = Path(name).expanduser()
    if not path.exists():
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES or name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
            raise UserError(f"{name}: file or folder not found")
        path = _hub_snapshot(name)
    if path.is_dir():
        if not ((path / "unet").is_dir() or (path / "transformer").is_dir()):
            raise UserError(
                f"{path}: this folder is not a diffusers model (no unet/ or transformer/ subfolder). Give a diffusers "
                "model folder (with model_index.json, unet/ or transformer/, vae/, text_encoder/) or a "
                ".safetensors/.ckpt file."
            )
        return path
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise UserError(
            f"{path}: unsupported model file type '{path.suffix}'. Use .safetensors (recommended), .ckpt or .pt."
        )
    return path


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


_HUB_FILES = ["model_index.json", "*/*.json", "tokenizer/*.txt"]
_HUB_WEIGHTS = {
    ".safetensors": [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ],
    ".bin": ["unet/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin"],
}


def _hub_snapshot(repo_id: str) -> Path:
    """A cached (or, when online, downloaded) snapshot of the model parts we use: configs, tokenizer, and
    one weights file per part (safetensors preferred, no fp16/EMA variants)."""
    from huggingface_hub import snapshot_download

    def fetch(local: bool) -> Path:
        for weights in _HUB_WEIGHTS.values():
            folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES + weights, local_files_only=local))
            if all((folder / w).is_file() for w in weights):
                return folder
        raise FileNotFoundError(f"{repo_id} has no complete set of unet/vae/text_encoder weights")

    try:
        return fetch(local=True)
    except Exception as cached_err:  # noqa: BLE001 - any failure means "not usable from the cache"
        reason = f"no such local file or folder, and not in the local Hugging Face cache ({type(cached_err).__name__})"
    how = (
        "Download it on a machine with internet (e.g. "
        f"`hf download {repo_id} --local-dir models/{repo_id.split('/')[-1]}`), "
        "copy the folder here and pass that folder to --pretrained_model_name_or_path, or give a .safetensors file."
    )
    if _hub_offline():
        raise UserError(f"{repo_id}: {reason}; HF_HUB_OFFLINE is set, so nothing is downloaded. {how}")
    try:
        return fetch(local=False)
    except Exception as err:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        raise UserError(f"{repo_id}: {reason}, and downloading it failed ({type(err).__name__}: {err}). {how}") from err


# ------------------------------------------------------------------------------------------ family checks


def check_sd_family(family: ModelFamily, source: Path, keys=None) -> None:
    """Refuse an SD1 checkpoint with ``--v2`` and the reverse (``keys``: a single file's tensor names; a
    pickle, with no cheap header, is checked while it is read)."""
    if source.is_dir():
        _check_family(family, _folder_is_v2(source), source)
    elif keys is not None:
        _check_family(family, _single_file_is_v2(dict.fromkeys(keys), source), source)


def _check_family(requested: ModelFamily, is_v2: bool, source: Path) -> None:
    if sd_variant(requested).openclip == is_v2:
        return
    if is_v2:
        raise UserError(
            f"{source}: this is a Stable Diffusion 2.x model (OpenCLIP text encoder) but --v2 is not set. "
            "Add --v2, and --v_parameterization too for 768-v models (stable-diffusion-2, 2.1, 768-v-ema)."
        )
    raise UserError(
        f"{source}: this is a Stable Diffusion 1.x model (CLIP ViT-L text encoder) but --v2 is set. Remove --v2 "
        "(and --v_parameterization unless the model is a v-prediction SD1 fine-tune)."
    )


# ------------------------------------------------------------------------------------------ diffusers folders


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise UserError(f"{path}: missing; the model folder is incomplete") from err
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from err


def _adapt_text_keys(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Accept CLIP weights with or without the ``text_model.`` prefix (transformers 4 vs 5 files)."""
    bare = conv.strip_text_model_prefix(sd)
    if "embeddings.position_ids" not in expected and "text_model.embeddings.position_ids" not in expected:
        bare.pop("embeddings.position_ids", None)
    if any(k.startswith("text_model.") for k in expected):
        return {"text_model." + k: v for k, v in bare.items()}
    return bare


_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _adapt_vae_keys(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Old diffusers VAE folders name the attention projections query/key/value/proj_attn (conv 1x1 allowed)."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if ".attentions." in k and len(parts) >= 2 and parts[-2] in _LEGACY_VAE_ATTENTION:
            k = ".".join(parts[:-2] + [_LEGACY_VAE_ATTENTION[parts[-2]], parts[-1]])
        if ".attentions." in k and k.endswith("weight") and v.ndim == 4 and k in expected:
            v = v.reshape(v.shape[:2])
        out[k] = v
    return out


def _build_unet(config: dict, sd: dict[str, torch.Tensor], what: str, dtype, device):
    from diffusers import UNet2DConditionModel

    return build_with_weights(lambda: UNet2DConditionModel.from_config(config), sd, what, dtype=dtype, device=device)


def _build_vae(config: dict, sd: dict[str, torch.Tensor], what: str, dtype, device):
    from diffusers import AutoencoderKL

    return build_with_weights(
        lambda: AutoencoderKL.from_config(config), sd, what, dtype=dtype, device=device, adapt=_adapt_vae_keys
    )


def _build_text_encoder(config, sd: dict[str, torch.Tensor], what: str, dtype, device):
    from transformers import CLIPTextModel

    return build_with_weights(
        lambda: CLIPTextModel(config), sd, what, dtype=dtype, device=device, adapt=_adapt_text_keys
    )


def _load_vae_folder(folder: Path, dtype, device):
    config = _read_json(folder / "config.json")
    weights = read_weight_files(find_weights_file(folder, _DIFFUSERS_WEIGHTS))
    return _build_vae(config, weights, str(folder), dtype, device)


def _folder_is_v2(folder: Path) -> bool:
    index = folder / "model_index.json"
    if index.is_file():
        cls = _read_json(index).get("_class_name", "")
        if "XL" in cls or (folder / "text_encoder_2").is_dir():
            raise UserError(f"{folder}: {cls or 'SDXL'} models are not supported by this loader yet (SD1.x/2.x only)")
    te = _read_json(folder / "text_encoder" / "config.json")
    return te.get("hidden_act") == "gelu"


def _load_folder(folder: Path, family: ModelFamily, dtype, device, with_vae: bool) -> tuple[Any, Any, Any]:
    from transformers import CLIPTextConfig

    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        prediction = _read_json(scheduler).get("prediction_type", "epsilon")
        if prediction != family.prediction_type:
            logger.warning(
                "%s: the model's scheduler uses prediction_type=%s but training uses %s (%s --v_parameterization)",
                folder, prediction, family.prediction_type, "with" if family.objective.is_v_prediction else "without",
            )
    unet_dir, te_dir = folder / "unet", folder / "text_encoder"
    unet = _build_unet(
        _read_json(unet_dir / "config.json"),
        read_weight_files(find_weights_file(unet_dir, _DIFFUSERS_WEIGHTS)),
        str(unet_dir), dtype, device,
    )
    vae = _load_vae_folder(folder / "vae", dtype, device) if with_vae else None
    te_config = CLIPTextConfig.from_dict(_read_json(te_dir / "config.json"))
    text_encoder = _build_text_encoder(
        te_config, read_weight_files(find_weights_file(te_dir, _TRANSFORMERS_WEIGHTS)), str(te_dir), dtype, device
    )
    return unet, vae, text_encoder


# ------------------------------------------------------------------------------------------ single files


def _split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _single_file_is_v2(tensors: dict[str, torch.Tensor], path: Path) -> bool:
    if any(k.startswith(conv.OPENCLIP_PREFIX) for k in tensors):
        return True
    if any(k.startswith(conv.CLIP_PREFIX) for k in tensors):
        return False
    if any(k.startswith("conditioner.embedders.") for k in tensors):
        raise UserError(f"{path}: this is an SDXL checkpoint; SDXL is not supported by this loader yet")
    raise UserError(
        f"{path}: not a Stable Diffusion 1.x/2.x checkpoint: no text encoder weights "
        f"({conv.CLIP_PREFIX}* or {conv.OPENCLIP_PREFIX}*). Is it a LoRA, a VAE or an embedding?"
    )


def _infer(infer, sd: dict[str, torch.Tensor], family: ModelFamily, meta: dict[str, Any], what: str):
    try:
        return infer(sd, family, meta)
    except KeyError as err:
        raise UserError(
            f"{what}: the weights do not match the model structure (missing weight {err.args[0]}); the file is "
            "incomplete or of another architecture"
        ) from err


def _load_single_file(
    path: Path, family: ModelFamily, dtype, device, with_vae: bool, weights: tuple[dict, dict] | None = None
) -> tuple[Any, Any, Any]:
    tensors, metadata = weights if weights is not None else read_weights(path)
    _check_family(family, _single_file_is_v2(tensors, path), path)
    meta = parse_architecture_metadata(metadata.get(ARCHITECTURE_METADATA_KEY), str(path))
    for prefix, part in ((conv.UNET_PREFIX, "UNet"), (conv.VAE_PREFIX, "VAE")):
        if (part == "UNet" or with_vae) and not any(k.startswith(prefix) for k in tensors):
            raise UserError(f"{path}: no {part} weights ({prefix}*) in this checkpoint")
    unet_sd = conv.unet_ldm_to_diffusers(_split_prefix(tensors, conv.UNET_PREFIX))
    vae_sd = conv.vae_ldm_to_diffusers(_split_prefix(tensors, conv.VAE_PREFIX)) if with_vae else None
    if sd_variant(family).openclip:
        te_sd = conv.openclip_to_bare(_split_prefix(tensors, conv.OPENCLIP_PREFIX))
    else:
        te_sd = conv.clip_ldm_to_bare(_split_prefix(tensors, conv.CLIP_PREFIX))
    tensors.clear()  # also the caller's copy: unused weights (EMA copies, a replaced VAE) are freed now
    what = {"unet": f"{path} (UNet)", "vae": f"{path} (VAE)", "text_encoder": f"{path} (text encoder)"}
    unet_config = _infer(infer_unet_config, unet_sd, family, meta.get("unet", {}), what["unet"])
    vae_config = _infer(infer_vae_config, vae_sd, family, meta.get("vae", {}), what["vae"]) if with_vae else None
    te_config = _infer(infer_text_config, te_sd, family, meta.get("text_encoder", {}), what["text_encoder"])
    unet = _build_unet(unet_config, unet_sd, what["unet"], dtype, device)
    vae = _build_vae(vae_config, vae_sd, what["vae"], dtype, device) if with_vae else None
    text_encoder = _build_text_encoder(te_config, te_sd, what["text_encoder"], dtype, device)
    return unet, vae, text_encoder


def load_vae(name: str, family: ModelFamily, *, dtype: torch.dtype = torch.float32, device="cpu"):
    """A VAE from ``--vae``: a diffusers folder (or a model folder with ``vae/``), or a file holding a
    VAE alone (LDM or diffusers names) or a whole SD checkpoint (``first_stage_model.*``)."""
    path = Path(name).expanduser()
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise UserError(f"--vae {path}: a folder must be a diffusers VAE (config.json + weights) or contain vae/")
        return _load_vae_folder(folder, dtype, device)
    if not path.is_file():
        raise UserError(f"--vae {name}: file or folder not found")
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise UserError(f"--vae {path}: unsupported file type '{path.suffix}' (use .safetensors, .ckpt, .pt or .bin)")
    tensors, metadata = read_weights(path)
    if any(k.startswith(conv.VAE_PREFIX) for k in tensors):
        tensors = _split_prefix(tensors, conv.VAE_PREFIX)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(("model_ema.", "loss."))}
    sd = conv.vae_ldm_to_diffusers(tensors) if conv.is_ldm_vae(tensors) else tensors
    meta = parse_architecture_metadata(metadata.get(ARCHITECTURE_METADATA_KEY), str(path)).get("vae", {})
    if "encoder.conv_in.weight" not in sd:
        raise UserError(f"--vae {path}: no VAE weights found (expected encoder.*/decoder.* or first_stage_model.*)")
    return _build_vae(_infer(infer_vae_config, sd, family, meta, f"--vae {path}"), sd, f"--vae {path}", dtype, device)


def checkpoint_is_v2(name: str | os.PathLike) -> bool:
    """Whether a local model file or diffusers folder is SD2.x (from its header or configs; no weights read
    except for pickles, which have no header)."""
    source = resolve_model_path(str(name))
    if source.is_dir():
        return _folder_is_v2(source)
    if source.suffix.lower() == ".safetensors":
        return _single_file_is_v2(dict.fromkeys(safetensors_keys(source)), source)
    return _single_file_is_v2(read_weights(source)[0], source)


# ------------------------------------------------------------------------------------------ entry point


def load_sd_models(args, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   family: ModelFamily | None = None) -> SDModels:
    """Load the model named by ``args.pretrained_model_name_or_path`` (see docs/models.md).

    ``family`` is the run's family (``library.models.families.resolve_family``); without it the family is
    resolved here from ``args.v2`` / ``args.v_parameterization`` and the checkpoint. Also reads ``args.vae``
    and ``args.tokenizer_cache_dir`` (missing attributes count as unset).
    """
    source = resolve_model_path(getattr(args, "pretrained_model_name_or_path", None))
    vae_name = getattr(args, "vae", None)
    if vae_name and not Path(vae_name).expanduser().exists():
        raise UserError(f"--vae {vae_name}: file or folder not found")
    if family is None:
        from library.models.families import resolve_family

        family = resolve_family(args, source=source)
    cache_dir = getattr(args, "tokenizer_cache_dir", None)
    model_dir = source if source.is_dir() else None
    pickled = None
    if source.is_file() and source.suffix.lower() != ".safetensors":
        # a pickle has no cheap header: read it once, here, so that a wrong --v2 is reported before the tokenizer
        pickled = read_weights(source)
        _check_family(family, _single_file_is_v2(pickled[0], source), source)
    tokenizer = load_tokenizer(family, model_dir=model_dir, cache_dir=cache_dir)
    if source.is_dir():
        unet, vae, text_encoder = _load_folder(source, family, dtype, device, with_vae=not vae_name)
    else:
        unet, vae, text_encoder = _load_single_file(source, family, dtype, device, not vae_name, pickled)
    if vae_name:
        vae = load_vae(vae_name, family, dtype=dtype, device=device)
    return SDModels(
        family=family,
        unet=unet,
        vae=vae,
        text_encoders=[text_encoder],
        tokenizers=[tokenizer],
        source=str(source),
        vae_source=str(Path(vae_name).expanduser()) if vae_name else None,
    )
