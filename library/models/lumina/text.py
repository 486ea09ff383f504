"""Lumina 2 text conditioning: Gemma2's second-to-last hidden states and the attention mask.

Every caption gets the system prompt in front as sd-scripts writes it (``"<system> <Prompt Start> <caption>"``,
nothing when ``--system_prompt`` is empty). ``tokenize`` packs ids and mask into one tensor ``[B, 2L]`` (``L``
is ``--gemma2_max_token_length``, default 256, padded to a multiple of 8) so the shared
:class:`library.training.text_cache.TextConditioner` can drive it; ``encode`` returns ``{"gemma2_hidden",
"gemma2_mask"}``, which ``LuminaSpec.forward`` consumes. The system prompt and the length are part of
``cache_settings``, so cached outputs are keyed by them.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

DEFAULT_MAX_LENGTH = 256
PROMPT_START = "<Prompt Start>"


def system_prefix(system_prompt: str | None) -> str:
    """What goes in front of every caption (sd-scripts' ``LuminaTokenizeStrategy``)."""
    return f"{system_prompt} {PROMPT_START} " if system_prompt else ""


class LuminaTextEncoding:
    """Tokenize and encode captions for Lumina 2 (see the module docstring)."""

    def __init__(self, tokenizer: Any, gemma2: Any, *, max_length: int, system_prompt: str):
        self.tokenizer, self.gemma2 = tokenizer, gemma2
        self.max_length = -(-max_length // 8) * 8  # sd-scripts pads to a multiple of 8
        self.system_prompt = system_prompt

    @classmethod
    def from_args(cls, models: Any, args: argparse.Namespace) -> "LuminaTextEncoding":
        length = args.gemma2_max_token_length or DEFAULT_MAX_LENGTH
        return cls(models.tokenizers[0], models.text_encoders[0], max_length=length,
                   system_prompt=args.system_prompt or "")

    @property
    def cache_settings(self) -> str:
        """What, besides the weights, changes the outputs (part of the text cache's identity)."""
        return f"gemma_len={self.max_length}|system_prompt={self.system_prompt!r}|vocab={len(self.tokenizer)}"

    def tokenize(self, captions: list[str], system: bool = True) -> torch.Tensor:
        """Ids and mask ``[B, 2L]``; ``system=False`` leaves the system prompt out (negative prompts)."""
        prefix = system_prefix(self.system_prompt) if system else ""
        out = self.tokenizer([prefix + c for c in captions], padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt")
        return torch.cat([out.input_ids, out.attention_mask], dim=1)

    def encode(self, ids: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        length = ids.shape[1] // 2
        tokens, mask = ids[:, :length], ids[:, length:]
        out = self.gemma2(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
        return {"gemma2_hidden": out.hidden_states[-2], "gemma2_mask": mask}
