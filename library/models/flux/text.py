"""FLUX.1 text conditioning: CLIP-L's pooled output and T5's hidden states (with its attention mask).

``tokenize`` packs both tokenizations into one id tensor ``[B, 77 + 2L]`` (CLIP ids, T5 ids, T5 mask) so
the shared :class:`library.training.text_cache.TextConditioner` can drive it; ``encode`` returns the mapping
``{"l_pooled", "t5_out", "t5_attn_mask" (with --apply_t5_attn_mask), "guidance"}`` that
``FluxSpec.forward`` consumes.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

CLIP_LENGTH = 77


class FluxTextEncoding:
    """Tokenize and encode captions for FLUX (see the module docstring)."""

    def __init__(self, clip_tokenizer: Any, clip: Any, t5_tokenizer: Any, t5: Any, *, t5_max_length: int,
                 apply_t5_attn_mask: bool, guidance_scale: float):
        self.clip_tokenizer, self.clip = clip_tokenizer, clip
        self.t5_tokenizer, self.t5 = t5_tokenizer, t5
        self.t5_max_length = t5_max_length
        self.apply_t5_attn_mask = apply_t5_attn_mask
        self.guidance_scale = guidance_scale

    @classmethod
    def from_args(cls, models: Any, args: argparse.Namespace) -> "FluxTextEncoding":
        from library.models.flux.arguments import resolved_guidance, resolved_t5_length

        return cls(models.tokenizers[0], models.text_encoders[0], models.tokenizers[1], models.text_encoders[1],
                   t5_max_length=resolved_t5_length(args, models.family),
                   apply_t5_attn_mask=bool(args.apply_t5_attn_mask),
                   guidance_scale=resolved_guidance(args, models.family))

    @property
    def cache_settings(self) -> str:
        """What, besides the weights, changes the outputs (part of the text cache's identity)."""
        return (f"t5_len={self.t5_max_length}|t5_mask={self.apply_t5_attn_mask}|guidance={self.guidance_scale}|"
                f"t5_vocab={len(self.t5_tokenizer)}")

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        clip = self.clip_tokenizer(captions, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                                   return_tensors="pt").input_ids
        t5 = self.t5_tokenizer(captions, padding="max_length", max_length=self.t5_max_length, truncation=True,
                               return_tensors="pt")
        return torch.cat([clip, t5.input_ids, t5.attention_mask], dim=1)

    def encode(self, ids: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        length = self.t5_max_length
        clip_ids, t5_ids, mask = ids[:, :CLIP_LENGTH], ids[:, CLIP_LENGTH:CLIP_LENGTH + length], ids[:, -length:]
        pooled = self.clip(clip_ids).pooler_output
        t5_out = self.t5(t5_ids, attention_mask=mask if self.apply_t5_attn_mask else None).last_hidden_state
        out = {"l_pooled": pooled, "t5_out": t5_out,
               "guidance": torch.full((ids.shape[0],), self.guidance_scale, device=ids.device)}
        if self.apply_t5_attn_mask:
            out["t5_attn_mask"] = mask
        return out
