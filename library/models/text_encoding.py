"""Caption tokenization and text encoding for SD1.x/SD2.x, with sd-scripts' long-caption windows.

With ``--max_token_length`` 150 or 225 a caption is split into ``n = max_token_length / 75`` windows of
``<BOS> 75 tokens <EOS or PAD>`` (shape ``[n, 77]``); each window goes through the text encoder on its own
and the outputs are joined back as ``<BOS> body_1 ... body_n <EOS>`` (``n * 75 + 2`` positions).
"""

from __future__ import annotations

from typing import Sequence

import torch

from library.errors import UserError
from library.models.arguments import parse_max_token_length

WINDOW = 77
BODY = WINDOW - 2


class TextEncoding:
    """Tokenize and encode captions for one CLIP text encoder.

    ``clip_skip=k`` takes the k-th last hidden state and applies the final layer norm (k=1 is the normal
    output). ``v2`` pads with id 0 (SD2's ``!``) even when given a tokenizer that pads with ``<|endoftext|>``.
    """

    def __init__(
        self,
        tokenizer,
        text_encoder,
        *,
        max_token_length: int | None = None,
        clip_skip: int | None = None,
        v2: bool = False,
    ):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        limit = parse_max_token_length(max_token_length)
        self.chunks = 1 if limit is None else limit // BODY
        self.max_length = self.chunks * BODY + 2
        layers = text_encoder.config.num_hidden_layers
        if clip_skip is not None and not 1 <= clip_skip <= layers:
            raise UserError(f"--clip_skip {clip_skip}: must be between 1 and {layers} (the text encoder's layer count)")
        self.clip_skip = clip_skip
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.pad = 0 if v2 else tokenizer.pad_token_id
        if tokenizer.model_max_length != WINDOW:
            raise ValueError(f"expected a CLIP tokenizer with model_max_length {WINDOW}, got {tokenizer.model_max_length}")

    # ------------------------------------------------------------------ tokenizing

    def _flat(self, body: Sequence[int]) -> list[int]:
        body = list(body)[: self.max_length - 2]
        ids = [self.bos, *body, self.eos]
        return ids + [self.pad] * (self.max_length - len(ids))

    def _windows(self, flat: torch.Tensor, fix: bool) -> torch.Tensor:
        """``[B, n*75+2]`` -> ``[B, n, 77]``: each window gets the BOS and the sequence's last token."""
        if self.chunks == 1:
            return flat[:, None, :]
        windows = []
        for i in range(self.chunks):
            w = torch.cat([flat[:, :1], flat[:, 1 + i * BODY : 1 + (i + 1) * BODY], flat[:, -1:]], dim=1)
            if fix and self.pad != self.eos:
                # SD2: a window cut inside the caption ends with EOS; an empty window reads <BOS> <EOS> <PAD>...
                cut = (w[:, -2] != self.eos) & (w[:, -2] != self.pad)
                w[cut, -1] = self.eos
                w[w[:, 1] == self.pad, 1] = self.eos
            windows.append(w)
        return torch.stack(windows, dim=1)

    def _token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=self.max_length - 2).input_ids

    def tokenize(self, captions: str | Sequence[str]) -> torch.Tensor:
        """``LongTensor[B, n, 77]`` for a caption or a list of captions."""
        if isinstance(captions, str):
            captions = [captions]
        flat = torch.tensor([self._flat(self._token_ids(c)) for c in captions], dtype=torch.long)
        return self._windows(flat, fix=True)

    def tokenize_weighted(self, captions: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, weights)``, both ``[B, n, 77]``: A1111 attention syntax (``(word:1.3)``, ``[word]``) gives
        per-token weights; BOS/EOS/padding have weight 1."""
        from library.dataset.captions import parse_weighted_caption

        if isinstance(captions, str):
            captions = [captions]
        ids, weights = [], []
        for caption in captions:
            tokens: list[int] = []
            token_weights: list[float] = []
            for text, weight in parse_weighted_caption(caption):
                part = self._token_ids(text)
                tokens += part
                token_weights += [weight] * len(part)
            flat = self._flat(tokens)
            kept = token_weights[: self.max_length - 2]
            ids.append(flat)
            weights.append([1.0, *kept] + [1.0] * (self.max_length - 1 - len(kept)))
        ids_t = self._windows(torch.tensor(ids, dtype=torch.long), fix=True)
        weights_t = self._windows(torch.tensor(weights, dtype=torch.float32), fix=False)
        return ids_t, weights_t

    # ------------------------------------------------------------------ encoding

    def _join(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """``[B*n, 77, ...]`` -> ``[B, n*75+2, ...]``: first BOS, the window bodies, the last window's end."""
        x = x.reshape(batch, self.chunks * WINDOW, *x.shape[2:])
        if self.chunks == 1:
            return x
        parts = [x[:, :1]] + [x[:, i * WINDOW + 1 : i * WINDOW + 1 + BODY] for i in range(self.chunks)] + [x[:, -1:]]
        return torch.cat(parts, dim=1)

    def encode(self, input_ids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``[B, n*75+2, dim]`` for ``input_ids`` ``[B, n, 77]``; ``weights`` (same shape as the
        ids) multiply each token's hidden state (no re-normalisation, as sd-scripts)."""
        if input_ids.ndim == 2:
            input_ids = input_ids[:, None, :]
        batch, chunks, width = input_ids.shape
        if chunks != self.chunks or width != WINDOW:
            raise ValueError(f"expected input ids [B, {self.chunks}, {WINDOW}], got {list(input_ids.shape)}")
        te = self.text_encoder
        tokens = input_ids.reshape(-1, WINDOW).to(te.device)
        if self.clip_skip is None:
            hidden = te(tokens)[0]
        else:
            out = te(tokens, output_hidden_states=True, return_dict=True)
            final_norm = getattr(te, "text_model", te).final_layer_norm
            hidden = final_norm(out.hidden_states[-self.clip_skip])
        hidden = self._join(hidden, batch)
        if weights is not None:
            w = self._join(weights.reshape(-1, WINDOW).to(hidden.device), batch)
            hidden = hidden * w.to(hidden.dtype).unsqueeze(-1)
        return hidden
