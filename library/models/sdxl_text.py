"""SDXL text conditioning: two CLIP encoders, sd-scripts' long-caption windows for both.

``encode`` returns ``{"encoder_hidden_states": [B, n*75+2, 768+1280], "text_embeds": [B, 1280]}``: TE1's
and TE2's penultimate hidden states (no final layer norm) side by side, and TE2's pooled output (the
final-norm state at the first EOS, through ``text_projection``) of the first window, as sd-scripts does.
"""

from __future__ import annotations

from typing import Sequence

import torch

from library.models.text_encoding import WINDOW, TextEncoding


class SDXLTextEncoding:
    """Tokenize and encode captions for SDXL's two text encoders (same interface as ``TextEncoding``)."""

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence, *, max_token_length: int | None = None):
        self.te1 = TextEncoding(tokenizers[0], text_encoders[0], max_token_length=max_token_length)
        self.te2 = TextEncoding(tokenizers[1], text_encoders[1], max_token_length=max_token_length, v2=True)
        self.eos = self.te1.eos
        self.chunks = self.te1.chunks

    def tokenize(self, captions: str | Sequence[str]) -> torch.Tensor:
        """``LongTensor[B, 2, n, 77]``: the ids of both tokenizers (they differ in padding only)."""
        return torch.stack([self.te1.tokenize(captions), self.te2.tokenize(captions)], dim=1)

    def tokenize_weighted(self, captions: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids1, weights = self.te1.tokenize_weighted(captions)
        ids2, _ = self.te2.tokenize_weighted(captions)
        return torch.stack([ids1, ids2], dim=1), weights

    @staticmethod
    def _penultimate(encoding: TextEncoding, ids: torch.Tensor, batch: int, pooled: bool):
        te = encoding.text_encoder
        out = te(ids.reshape(-1, WINDOW).to(te.device), output_hidden_states=True, return_dict=True)
        hidden = encoding._join(out.hidden_states[-2], batch)
        if not pooled:
            return hidden, None
        return hidden, out.text_embeds.reshape(batch, encoding.chunks, -1)[:, 0]

    def encode(self, input_ids: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The conditioning of ``input_ids`` ``[B, 2, n, 77]``; ``weights`` ``[B, n, 77]`` scale each token's
        hidden states (not the pooled output), as sd-scripts."""
        batch = input_ids.shape[0]
        h1, _ = self._penultimate(self.te1, input_ids[:, 0], batch, pooled=False)
        h2, pooled = self._penultimate(self.te2, input_ids[:, 1], batch, pooled=True)
        hidden = torch.cat([h1, h2.to(h1.dtype)], dim=-1)
        if weights is not None:
            w = self.te1._join(weights.reshape(-1, WINDOW).to(hidden.device), batch)
            hidden = hidden * w.to(hidden.dtype).unsqueeze(-1)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled}
