"""Loading a VLM offline: a local transformers folder (or a hub id already in the local cache, or fetched when
the hub is reachable and allowed), its tokenizer and image processor, optional 4-bit quantization (bitsandbytes,
imported only when asked) and a PEFT adapter. Every problem is a :class:`UserError` before the weights load."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.vlm.families import FAMILIES, SUPPORTED_MODELS, VLMFamily, family_for, known_model

BITSANDBYTES_HINT = "pip install bitsandbytes==0.50.2"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class VLM:
    model: Any
    tokenizer: Any
    image_processor: Any
    family: VLMFamily
    folder: Path  # the base model's folder (processing files)


def resolve_model_path(name: str, *, flag: str = "--model_path") -> Path:
    """A local folder for ``name``: the folder itself, or a hub id / registry id (``vlm_supported_models.py``)
    from the local Hugging Face cache, downloaded only when the hub is reachable and not switched off."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{flag} {path}: not a transformers model folder (no config.json)")
        return path
    if path.exists():
        raise UserError(f"{flag} {path}: give a transformers model folder (config.json, safetensors, tokenizer and "
                        "preprocessor files), not a single file")
    entry = known_model(name)
    repo = entry.hf_path if entry else name
    if not HUB_ID.match(repo):
        ids = ", ".join(m.model_id for m in SUPPORTED_MODELS)
        raise UserError(f"{flag} {name}: no such folder, and not a hub id (owner/name) or a known model id ({ids})")
    return _hub_folder(repo, flag)


def _hub_folder(repo: str, flag: str) -> Path:
    from library.tools.hub_files import hub_offline

    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise UserError(f"{flag} {repo}: huggingface_hub is missing; download the model and pass its folder") from None
    manual = f"download it (hf download {repo} --local-dir DIR) and pass {flag} DIR"
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # not in the local cache
        pass
    if hub_offline():
        raise UserError(f"{flag} {repo}: not in the local Hugging Face cache and the hub is switched off "
                        f"(HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); {manual}")
    print(f"downloading {repo} from the Hugging Face Hub")
    try:
        return Path(snapshot_download(repo))
    except Exception as err:  # network, authentication, missing repo: all mean "not reachable"
        raise UserError(f"{flag} {repo}: could not be fetched from the Hugging Face Hub "
                        f"({type(err).__name__}: {str(err)[:200]}); {manual}") from None


def read_model_type(folder: Path, flag: str = "--model_path") -> str:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{flag} {folder}: cannot read config.json ({err})") from None
    model_type = config.get("model_type", "")
    if model_type not in FAMILIES:
        raise UserError(f"{flag} {folder}: model_type '{model_type}' is not supported; supported: "
                        f"{', '.join(FAMILIES)} (see vlm_supported_models.py)")
    return model_type


def load_processing(folder: Path) -> tuple[Any, Any]:
    """The tokenizer and image processor (PIL backend without torchvision) of a model folder."""
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{folder}: cannot load the tokenizer / image processor "
                        f"({' '.join(str(err).split())[:300]}); the folder needs tokenizer.json (or vocab.json + "
                        "merges.txt), tokenizer_config.json and preprocessor_config.json") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, image_processor


def quantization_config(bits: int | None, compute_dtype: torch.dtype, keep: tuple[str, ...] = ()) -> Any:
    """A bitsandbytes config for QLoRA (``bits`` 4 or 8), or None; the modules named in ``keep`` (the projector,
    which trains in full, and the output layer) stay unquantized. A UserError says how to install it."""
    if not bits:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"--q_lora / --bits {bits} need the bitsandbytes package, which is not installed: "
                        f"{BITSANDBYTES_HINT} (or train without quantization)") from None
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(keep))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(keep))


def load_vlm(folder: Path, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None,
             bits: int | None = None, flag: str = "--model_path") -> VLM:
    """The model (eval mode) with its tokenizer, image processor and family."""
    from safetensors import SafetensorError
    from transformers import AutoModelForImageTextToText

    family = FAMILIES[read_model_type(folder, flag)]
    tokenizer, image_processor = load_processing(folder)
    quant = quantization_config(bits, dtype, (family.projector, "lm_head"))
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index if device is not None and device.type == "cuda" else "cpu"}
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        raise UserError(f"{flag} {folder}: cannot load the model ({' '.join(str(err).split())[:400]})") from None
    if quant is None and device is not None:
        model.to(device)
    if quant is not None and (device is None or device.type == "cpu"):
        _plain_cpu_4bit_matmul(model)
    return VLM(model.eval(), tokenizer, image_processor, family_for(model.config, image_processor), folder)


def _plain_cpu_4bit_matmul(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights (used on CPUs with AVX512-BF16 in eval mode
    without gradients): it rewrites the weights in place into a bf16 layout, so a validation pass changes the model's
    numbers and the next training step fails, and it fails outright on layers narrower than its block size (64)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def adapter_base_path(adapter: Path) -> str | None:
    """The base model an adapter folder was trained on (vlm_training.json, else adapter_config.json)."""
    for name, key in (("vlm_training.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            value = json.loads((adapter / name).read_text(encoding="utf-8")).get(key)
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if value:
            return str(value)
    return None


def check_adapter_folder(adapter: Path, flag: str = "--lora_path") -> None:
    if not adapter.is_dir():
        raise UserError(f"{flag} {adapter} does not exist or is not a folder")
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{flag} {adapter}: not a PEFT adapter folder (no adapter_config.json); give the folder "
                        "vlm_train.py wrote")


def apply_adapter(vlm: VLM, adapter: Path, *, trainable: bool = False) -> None:
    """Load a PEFT adapter (LoRA weights and the projector it saved) onto ``vlm.model``."""
    from peft import PeftModel

    check_adapter_folder(adapter)
    try:
        vlm.model = PeftModel.from_pretrained(vlm.model, str(adapter), is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"--lora_path {adapter}: the adapter does not fit the base model {vlm.folder} "
                        f"({' '.join(str(err).split())[:300]})") from None
    if not trainable:
        vlm.model.eval()


def resolve_base_and_adapter(base: str | None, adapter: str | None) -> tuple[Path, Path | None]:
    """``--base_model`` (or the one recorded in the adapter) and ``--lora_path`` as checked folders."""
    adapter_path = Path(adapter) if adapter else None
    if adapter_path is not None and not (adapter_path / "head.safetensors").is_file():
        check_adapter_folder(adapter_path)
    if base is None:
        recorded = adapter_base_path(adapter_path) if adapter_path else None
        if recorded is None:
            raise UserError("--base_model is required (the adapter does not record its base model)")
        base = recorded
    return resolve_model_path(base, flag="--base_model"), adapter_path
