"""The captioning models the trainers and captioners know: BLIP and Florence-2, through transformers' native
classes (no ``trust_remote_code``, no torchvision: the image processors fall back to their PIL versions).

A :class:`CaptionerFamily` turns images and caption token ids into the model's training inputs, and images
into captions, the way the model generates:

- BLIP's decoder starts with ``[DEC]`` (``bos_token_id``) in ``generate()``, so the training input's first
  token (the tokenizer's ``[CLS]``) is replaced with it; padding is -100 in the labels.
- Florence-2 is an encoder-decoder: the task prompt (``<DETAILED_CAPTION>`` ...) goes with the image to the
  encoder, the caption (``<s> ... </s>``) is the decoder's labels, padding -100.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from library.errors import UserError
from library.tools.hub_files import hub_offline

FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")


@dataclass
class Captioner:
    """A loaded model with its tokenizer and image processor (and, for Florence-2, its processor)."""

    family: "CaptionerFamily"
    model: Any
    tokenizer: Any
    image_processor: Any
    processor: Any = None
    task: str = ""

    def tokenize_captions(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each caption (special tokens included), unpadded."""
        return [list(ids) for ids in self.tokenizer(texts).input_ids]

    def training_inputs(self, images: list[Any], token_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        return self.family.training_inputs(self, images, token_ids)

    @torch.no_grad()
    def caption(self, images: list[Any], *, num_beams: int, max_length: int, min_length: int = 0) -> list[str]:
        limit = getattr(self.model.config.text_config, "max_position_embeddings", None) or max_length
        return self.family.caption(self, images, num_beams=num_beams, max_length=min(max_length, limit - 1),
                                   min_length=min_length)


def pad_labels(token_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)``, right-padded to the longest; labels are -100 at padding."""
    length = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), length), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, :len(ids)] = 1
    return input_ids, mask, input_ids.masked_fill(mask == 0, -100)


def _blip_inputs(cap: Captioner, images: list[Any], token_ids: list[list[int]]) -> dict[str, torch.Tensor]:
    input_ids, mask, labels = pad_labels(token_ids, cap.tokenizer.pad_token_id)
    input_ids[:, 0] = cap.model.config.text_config.bos_token_id  # [DEC], the token generate() starts with
    pixels = cap.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _blip_caption(cap: Captioner, images: list[Any], *, num_beams: int, max_length: int,
                  min_length: int) -> list[str]:
    model = cap.model
    device = next(model.parameters()).device
    pixels = cap.image_processor(images=images, return_tensors="pt")["pixel_values"].to(device, model.dtype)
    out = model.generate(pixel_values=pixels, num_beams=num_beams, max_length=max_length, min_length=min_length)
    return [t.strip() for t in cap.tokenizer.batch_decode(out, skip_special_tokens=True)]


def _florence_encoder(cap: Captioner, images: list[Any]) -> dict[str, torch.Tensor]:
    return dict(cap.processor(images=images, text=[cap.task] * len(images), return_tensors="pt"))


def _florence_inputs(cap: Captioner, images: list[Any], token_ids: list[list[int]]) -> dict[str, torch.Tensor]:
    _, _, labels = pad_labels(token_ids, cap.tokenizer.pad_token_id)
    return {**_florence_encoder(cap, images), "labels": labels}


def _florence_caption(cap: Captioner, images: list[Any], *, num_beams: int, max_length: int,
                      min_length: int) -> list[str]:
    model = cap.model
    device = next(model.parameters()).device
    inputs = _florence_encoder(cap, images)
    out = model.generate(input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device),
                         pixel_values=inputs["pixel_values"].to(device, model.dtype), num_beams=num_beams,
                         max_new_tokens=max_length, min_new_tokens=min_length)
    return [t.strip() for t in cap.tokenizer.batch_decode(out, skip_special_tokens=True)]


@dataclass(frozen=True)
class CaptionerFamily:
    name: str
    model_class: str  # in transformers
    default_model_id: str
    default_targets: tuple[str, ...]
    training_inputs: Callable[[Captioner, list[Any], list[list[int]]], dict[str, torch.Tensor]]
    caption: Callable[..., list[str]]
    uses_processor: bool = False


BLIP = CaptionerFamily(
    name="blip", model_class="BlipForConditionalGeneration",
    default_model_id="Salesforce/blip-image-captioning-base",
    # the seed's list: text decoder self- and cross-attention (query/key/value, output.dense) and the vision
    # tower; it reaches the text decoder (the later upstream default q_proj/v_proj/... matched only fc1/fc2)
    default_targets=("self.query", "self.key", "self.value", "output.dense", "self_attn.qkv", "self_attn.projection",
                     "mlp.fc1", "mlp.fc2"),
    training_inputs=_blip_inputs, caption=_blip_caption,
)
FLORENCE2 = CaptionerFamily(
    name="florence2", model_class="Florence2ForConditionalGeneration",
    default_model_id="florence-community/Florence-2-base-ft",
    # the language model's attention (encoder, decoder and cross-attention); the seed's list also matched the
    # DaViT vision tower (qkv, proj): name those to train it
    default_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
    training_inputs=_florence_inputs, caption=_florence_caption, uses_processor=True,
)
FAMILIES = {f.name: f for f in (BLIP, FLORENCE2)}


def _from_pretrained(cls: Any, source: str, what: str, **kwargs: Any) -> Any:
    """A local folder, or a hub id already in the local cache; the hub only when reachable and never
    silently (the download is announced)."""
    if Path(source).is_dir():
        try:
            return cls.from_pretrained(source, local_files_only=True, **kwargs)
        except (OSError, ValueError) as err:
            raise UserError(f"{source}: not a complete transformers {what} folder ({' '.join(str(err).split())[:300]})"
                            ) from err
    if Path(source).exists() or source.count("/") != 1:
        raise UserError(f"--model_id {source}: neither a model folder nor a Hugging Face id (owner/name)")
    try:
        return cls.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError:
        pass
    if hub_offline():
        raise UserError(f"{source} is not in the local Hugging Face cache and the hub is disabled (HF_HUB_OFFLINE); "
                        "download it, or pass a local model folder")
    print(f"downloading {source} from the Hugging Face Hub", flush=True)
    try:
        return cls.from_pretrained(source, **kwargs)
    except OSError as err:
        raise UserError(f"could not load {source} from the Hugging Face Hub ({err}); pass a local model folder") \
            from err


def check_model_family(source: str, family: CaptionerFamily) -> None:
    """A local folder's ``config.json`` must be the family's model (checked before loading)."""
    config = Path(source) / "config.json"
    if not config.is_file():
        if Path(source).is_dir():
            raise UserError(f"{source}: no config.json; give the folder of a transformers {family.model_class} model")
        return
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{config}: not valid JSON ({err})") from None
    model_type = settings.get("model_type")
    if "auto_map" in settings:
        raise UserError(f"{source} is a remote-code checkpoint (auto_map in config.json), which this toolkit does not "
                        "run (no trust_remote_code); use the native transformers checkpoint"
                        + (" (florence-community/Florence-2-base-ft)" if family is FLORENCE2 else ""))
    if model_type != family.name:
        raise UserError(f"{source} is a {model_type!r} model, not {family.model_class} ({family.name}); BLIP "
                        "models train with train_blip_network.py, Florence-2 with train_florence_lora.py")


def load_captioner(family: CaptionerFamily, source: str, *, task: str = "", quantization: Any = None,
                   device_map: Any = None) -> Captioner:
    """Load the model, tokenizer and image processor from ``source``."""
    import transformers

    check_model_family(source, family)
    processor = None
    if family.uses_processor:
        processor = _from_pretrained(transformers.AutoProcessor, source, "processor")
        tokenizer, image_processor = processor.tokenizer, processor.image_processor
    else:
        tokenizer = _from_pretrained(transformers.AutoTokenizer, source, "tokenizer")
        image_processor = _from_pretrained(transformers.AutoImageProcessor, source, "image processor")
    kwargs: dict[str, Any] = {}
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map=device_map)
    model = _from_pretrained(getattr(transformers, family.model_class), source, family.model_class, **kwargs)
    return Captioner(family, model, tokenizer, image_processor, processor, task)
