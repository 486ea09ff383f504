"""Loading Qwen2.5-VL for captioning: a transformers folder, or a single safetensors file (or shard set) in the
original / ComfyUI key layout, plus its tokenizer and image processor from a local folder."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.models.fp8 import Fp8Linear, to_fp8  # noqa: F401  (Fp8Linear: part of this module's API)

# Qwen/Qwen2.5-VL-7B-Instruct config.json: used for a single weights file without a config next to it.
QWEN25_VL_7B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 128000, "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}
PROCESSOR_FILES_HINT = ("tokenizer.json (or vocab.json + merges.txt), tokenizer_config.json, "
                        "preprocessor_config.json and chat_template.json of Qwen/Qwen2.5-VL-7B-Instruct")
SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d+)-of-(?P<count>\d+)\.safetensors$")


def weight_files(path: Path) -> list[Path]:
    """The file itself, or every shard of ``NAME-0000k-of-0000N.safetensors``."""
    match = SHARD.match(path.name)
    if not match:
        return [path]
    count, width = int(match["count"]), len(match["index"])
    files = [path.with_name(f"{match['stem']}-{i:0{width}d}-of-{match['count']}.safetensors")
             for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{path}: the shard set is incomplete, missing {', '.join(missing)}")
    return files


def to_transformers_key(key: str) -> str:
    """Original / ComfyUI names -> transformers 5 module names (``model.*`` is the language model)."""
    if key.startswith("model.language_model.") or key.startswith("model.visual."):
        return key
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key


def processor_folder(model_path: Path, processor_path: str | None) -> Path:
    folder = Path(processor_path) if processor_path else (model_path if model_path.is_dir() else model_path.parent)
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
    if not has_tokenizer or not (folder / "preprocessor_config.json").is_file():
        where = "--processor_path" if processor_path else "the model's folder"
        raise UserError(f"no Qwen2.5-VL tokenizer / image processor in {folder} ({where}); put the "
                        f"{PROCESSOR_FILES_HINT} there, or pass --processor_path to a folder that has them "
                        "(nothing is downloaded)")
    return folder


def load_config(model_path: Path, processor_dir: Path):
    from transformers import Qwen2_5_VLConfig

    for candidate in (model_path.parent / "config.json", processor_dir / "config.json"):
        if candidate.is_file():
            try:
                return Qwen2_5_VLConfig.from_json_file(str(candidate)), candidate
            except (ValueError, TypeError, json.JSONDecodeError) as err:
                raise UserError(f"{candidate}: not a Qwen2.5-VL config.json ({err})") from err
    return Qwen2_5_VLConfig.from_dict(QWEN25_VL_7B_CONFIG), None


def _load_state_dict(files: list[Path], dtype: torch.dtype, fp8_keys: set[str]) -> dict[str, torch.Tensor]:
    """Renamed tensors, each converted as it is read (float8 for ``fp8_keys``) to keep the peak memory low."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    name = to_transformers_key(key)
                    value = f.get_tensor(key)
                    if value.is_floating_point():
                        value = value.to(torch.float8_e4m3fn if name in fp8_keys else dtype)
                    state[name] = value
        except (SafetensorError, OSError) as err:
            raise UserError(f"{file}: cannot be read as safetensors ({err})") from err
    return state


def linear_weight_names(model: torch.nn.Module) -> set[str]:
    return {f"{name}.weight" for name, m in model.named_modules() if type(m) is torch.nn.Linear}


def load_single_file(model_path: Path, processor_dir: Path, dtype: torch.dtype, fp8: bool = False):
    """Build the model from its config without allocating it, then load the renamed weights strictly."""
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLForConditionalGeneration

    config, config_file = load_config(model_path, processor_dir)
    with init_empty_weights():
        model = Qwen2_5_VLForConditionalGeneration._from_config(config)
    fp8_keys = linear_weight_names(model) if fp8 else set()
    state = _load_state_dict(weight_files(model_path), dtype, fp8_keys)
    expected = set(model.state_dict())
    embed = state.get("model.language_model.embed_tokens.weight")
    if config.tie_word_embeddings and "lm_head.weight" not in state and embed is not None:
        state["lm_head.weight"] = embed
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    source = f"config {config_file}" if config_file else "the Qwen2.5-VL-7B config (no config.json beside it)"
    if missing or unexpected:
        raise UserError(f"{model_path}: the weights do not match {source}: {len(missing)} missing (e.g. "
                        f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); use a Qwen2.5-VL "
                        "checkpoint (the fp8_scaled ComfyUI file cannot be used) or put its config.json beside it")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise UserError(f"{model_path}: tensor shapes do not match {source}: {str(err)[:500]}") from err
    if config.tie_word_embeddings:
        model.tie_weights()
    if fp8:
        to_fp8(model)
    return model


def load_folder(model_path: Path, dtype: torch.dtype):
    from safetensors import SafetensorError
    from transformers import Qwen2_5_VLForConditionalGeneration

    if not (model_path / "config.json").is_file():
        raise UserError(f"{model_path}: a model folder needs config.json and its safetensors weights")
    try:
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_path), dtype=dtype,
                                                                  local_files_only=True)
    except (OSError, ValueError, SafetensorError) as err:  # missing or unusable weight files
        reason = " ".join(str(err).split())[:400]
        raise UserError(f"{model_path}: cannot load the Qwen2.5-VL model folder: {reason}") from err


@dataclass
class QwenVL:
    model: Any
    tokenizer: Any
    image_processor: Any
    processor: Any  # the transformers processor when it can be built (needs torchvision), else None
    chat_template: str
    device: torch.device
    dtype: torch.dtype


def load_qwen_vl(model_path: str, processor_path: str | None, device: torch.device, fp8: bool) -> QwenVL:
    from transformers import AutoImageProcessor, AutoTokenizer

    path = Path(model_path)
    if not path.exists():
        raise UserError(f"--model_path {path} does not exist")
    if path.is_file() and path.suffix != ".safetensors":
        raise UserError(f"--model_path {path}: give a .safetensors file or a transformers model folder")
    folder = processor_folder(path, processor_path)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:  # incomplete or foreign tokenizer / processor files
        raise UserError(f"{folder}: cannot load the Qwen2.5-VL tokenizer / image processor "
                        f"({' '.join(str(err).split())[:400]}); it needs the {PROCESSOR_FILES_HINT}") from err
    processor = _try_processor(folder)
    if path.is_dir():
        model = load_folder(path, dtype)
        if fp8:
            to_fp8(model)
    else:
        model = load_single_file(path, folder, dtype, fp8)
    model.to(device).eval()
    return QwenVL(model, tokenizer, image_processor, processor, chat_template(tokenizer, folder), device, dtype)


def _try_processor(folder: Path):
    """The real processor when it can be built; without torchvision it cannot (its video processor)."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return None
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # the inputs can still be assembled without it
        print(f"the transformers processor could not be built from {folder} ({type(err).__name__}: {err}); "
              "assembling the model inputs without it")
        return None


DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_template(tokenizer: Any, folder: Path) -> str:
    """The tokenizer's template, else the processor folder's chat_template.json / .jinja, else Qwen2.5-VL's."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    return DEFAULT_CHAT_TEMPLATE
