"""The supported VLM families behind one seam: prompt format, image-token accounting, vision inputs and module
names. Everything else (data, training, inference, merge, the head) works through :class:`VLMFamily`.

Inputs are assembled here rather than by the transformers processors, which cannot be built without
torchvision (their video processors need it): the image processor (PIL backend) makes the pixel tensors, and
the image placeholder is repeated once per image feature, as the processor would.

Both families speak ChatML. One prompt format (:meth:`VLMFamily.turn_prefix` and friends) is used in training
and inference alike, so the prompt of a training sample is exactly the prompt ``vlm_infer.py`` builds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class KnownModel:
    model_id: str
    hf_path: str
    family: str


# vlm_supported_models.py prints this table; vlm_train.py --model_id accepts the ids.
SUPPORTED_MODELS: tuple[KnownModel, ...] = (
    KnownModel("llava-onevision-0.5b-ov", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava_onevision"),
    KnownModel("llava-onevision-0.5b-si", "llava-hf/llava-onevision-qwen2-0.5b-si-hf", "llava_onevision"),
    KnownModel("llava-onevision-7b-ov", "llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava_onevision"),
    KnownModel("llava-onevision-7b-ov-chat", "llava-hf/llava-onevision-qwen2-7b-ov-chat-hf", "llava_onevision"),
    KnownModel("llava-onevision-72b-ov", "llava-hf/llava-onevision-qwen2-72b-ov-hf", "llava_onevision"),
    KnownModel("qwen2.5-vl-3b-instruct", "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl"),
    KnownModel("qwen2.5-vl-7b-instruct", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl"),
    KnownModel("qwen2.5-vl-32b-instruct", "Qwen/Qwen2.5-VL-32B-Instruct", "qwen2_5_vl"),
    KnownModel("qwen2.5-vl-72b-instruct", "Qwen/Qwen2.5-VL-72B-Instruct", "qwen2_5_vl"),
)


class VLMFamily:
    """What differs between model families. ``config`` is the model's transformers config."""

    name = ""
    model_type = ""
    image_token = ""
    language_prefix = "model.language_model."
    vision_prefix = ""
    projector = ""  # the module trained and saved with the adapter (``modules_to_save``)
    default_system_prompt: str | None = None

    def __init__(self, config: Any, image_processor: Any):
        self.config = config
        self.image_processor = image_processor

    # prompt format (ChatML)
    def image_marker(self) -> str:
        """The text one image stands for in a prompt (before expansion to its features)."""
        return self.image_token

    def system_block(self, system_prompt: str | None) -> str:
        text = system_prompt if system_prompt is not None else self.default_system_prompt
        return f"<|im_start|>system\n{text}{END_OF_TURN}\n" if text is not None else ""

    @staticmethod
    def user_block(text: str) -> str:
        return f"<|im_start|>user\n{text}{END_OF_TURN}\n"

    @staticmethod
    def assistant_prefix() -> str:
        return "<|im_start|>assistant\n"

    # image accounting
    def image_token_id(self) -> int:
        raise NotImplementedError

    def count_image_tokens(self, width: int, height: int, images_in_sample: int) -> int:
        """The number of image features (= placeholder tokens) of one image of ``width`` x ``height``."""
        raise NotImplementedError

    def vision_inputs(self, images: Sequence[Any], images_per_sample: Sequence[int]) -> dict[str, torch.Tensor]:
        """Pixel tensors (and their side information) for the images of a batch, in order."""
        raise NotImplementedError

    def extra_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inputs derived from the token ids (Qwen2.5-VL's ``mm_token_type_ids``)."""
        return {}

    # modules
    def is_vision_module(self, name: str) -> bool:
        return name.startswith(self.vision_prefix) and not self.is_projector(name)

    def is_projector(self, name: str) -> bool:
        return name == self.projector or name.startswith(self.projector + ".")

    def hidden_size(self) -> int:
        return int(self.config.text_config.hidden_size)


class LlavaOnevisionFamily(VLMFamily):
    name = "llava_onevision"
    model_type = "llava_onevision"
    image_token = "<image>"
    vision_prefix = "model.vision_tower"
    projector = "model.multi_modal_projector"

    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def _tile_tokens(self) -> int:
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def count_image_tokens(self, width: int, height: int, images_in_sample: int) -> int:
        # LLaVA-OneVision's anyres rule (as its processor counts): base tile + unpadded crop grid + row newlines;
        # an image of a multi-image sample is its base tile and one newline.
        from transformers.image_processing_utils import select_best_resolution

        base = self._tile_tokens()
        if images_in_sample != 1:
            count = base + 1
        else:
            tile = self.image_processor.size
            best_h, best_w = select_best_resolution([height, width], self.image_processor.image_grid_pinpoints)
            side = int(math.sqrt(base))
            cur_h, cur_w = side * (best_h // tile["height"]), side * (best_w // tile["width"])
            if width / height > cur_w / cur_h:
                new_h = int(round(height * (cur_w / width), 7))
                cur_h -= ((cur_h - new_h) // 2) * 2
            else:
                new_w = int(round(width * (cur_h / height), 7))
                cur_w -= ((cur_w - new_w) // 2) * 2
            unpadded, newlines = cur_h * cur_w, cur_h
            max_patches = int(str(getattr(self.config, "vision_aspect_ratio", "anyres_max_9")).strip("anyres_max_"))
            ratio = math.sqrt(cur_h * cur_w / (max_patches * side ** 2))
            if ratio > 1.1:
                unpadded, newlines = int(cur_h // ratio) * int(cur_w // ratio), int(cur_h // ratio)
            count = unpadded + newlines + base
        return count - 1 if self.config.vision_feature_select_strategy == "default" else count

    def vision_inputs(self, images: Sequence[Any], images_per_sample: Sequence[int]) -> dict[str, torch.Tensor]:
        nested, i = [], 0
        for n in images_per_sample:
            nested.append(list(images[i:i + n]))
            i += n
        out = self.image_processor(images=[x for x in nested if x], return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"],
                "batch_num_images": torch.tensor([n for n in images_per_sample if n], dtype=torch.long)}


class Qwen25VLFamily(VLMFamily):
    name = "qwen2_5_vl"
    model_type = "qwen2_5_vl"
    image_token = "<|image_pad|>"
    vision_prefix = "model.visual"
    projector = "model.visual.merger"
    default_system_prompt = "You are a helpful assistant."

    def image_marker(self) -> str:
        return f"<|vision_start|>{self.image_token}<|vision_end|>"

    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def count_image_tokens(self, width: int, height: int, images_in_sample: int) -> int:
        patches = self.image_processor.get_number_of_image_patches(height, width)
        return patches // self.image_processor.merge_size ** 2

    def vision_inputs(self, images: Sequence[Any], images_per_sample: Sequence[int]) -> dict[str, torch.Tensor]:
        out = self.image_processor(images=list(images), return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def extra_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        # without it transformers 5 silently gives the image tokens text positions
        return {"mm_token_type_ids": (input_ids == self.image_token_id()).long()}


FAMILIES: dict[str, type[VLMFamily]] = {f.model_type: f for f in (LlavaOnevisionFamily, Qwen25VLFamily)}


def family_for(config: Any, image_processor: Any) -> VLMFamily | None:
    """The family of a transformers config, or None when it is not supported."""
    cls = FAMILIES.get(getattr(config, "model_type", ""))
    return cls(config, image_processor) if cls else None


def known_model(model_id: str) -> KnownModel | None:
    for entry in SUPPORTED_MODELS:
        if model_id in (entry.model_id, entry.hf_path):
            return entry
    return None
