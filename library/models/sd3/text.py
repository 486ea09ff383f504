"""SD3 text conditioning: CLIP-L and CLIP-G (penultimate hidden states and projected pooled outputs) and T5.

``tokenize`` packs the three tokenizations and their masks into one id tensor
``[B, 77 + 77 + L + 77 + 77 + L]`` so the shared :class:`library.training.text_cache.TextConditioner` can drive it;
``encode`` returns ``{"l_out", "g_out", "l_pooled", "g_pooled", "t5_out"}``, kept apart so that per-encoder
dropout (``--clip_l_dropout_rate`` ...) can zero one encoder of a cached output. ``SD3Spec.conditioning`` joins
them as SD3 was trained: CLIP-L|CLIP-G features side by side, zero-padded to the T5 width, followed by the T5
tokens; pooled = CLIP-L|CLIP-G. As in sd-scripts, the masks (``--apply_lg_attn_mask``, ``--apply_t5_attn_mask``)
go to the text encoders only; the MMDiT attends to every token.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Mapping

import torch

CLIP_LENGTH = 77
PARTS = ("l", "g", "t5")


class SD3TextEncoding:
    """Tokenize and encode captions for SD3 (see the module docstring)."""

    def __init__(self, tokenizers: list[Any], encoders: list[Any], *, t5_max_length: int, apply_lg_attn_mask: bool,
                 apply_t5_attn_mask: bool, parts: tuple[str, ...] = PARTS):
        self.tokenizers, self.encoders = tokenizers, encoders
        self.t5_max_length = t5_max_length
        self.apply_lg_attn_mask = apply_lg_attn_mask
        self.apply_t5_attn_mask = apply_t5_attn_mask
        self.parts = parts  # the encoders ``encode`` runs (all three, or CLIP-L + CLIP-G / T5 alone)

    def only(self, parts: tuple[str, ...]) -> "SD3TextEncoding":
        """The same encoding running only the encoders in ``parts`` (``encode`` returns only their outputs)."""
        return SD3TextEncoding(self.tokenizers, self.encoders, t5_max_length=self.t5_max_length,
                               apply_lg_attn_mask=self.apply_lg_attn_mask, apply_t5_attn_mask=self.apply_t5_attn_mask,
                               parts=parts)

    @classmethod
    def from_args(cls, models: Any, args: argparse.Namespace) -> "SD3TextEncoding":
        return cls(list(models.tokenizers), list(models.text_encoders), t5_max_length=int(args.t5xxl_max_token_length),
                   apply_lg_attn_mask=bool(args.apply_lg_attn_mask), apply_t5_attn_mask=bool(args.apply_t5_attn_mask))

    @property
    def cache_settings(self) -> str:
        """What, besides the weights, changes the outputs (part of the text cache's identity)."""
        settings = (f"sd3|t5_len={self.t5_max_length}|lg_mask={self.apply_lg_attn_mask}|"
                    f"t5_mask={self.apply_t5_attn_mask}|t5_vocab={len(self.tokenizers[2])}")
        return settings if self.parts == PARTS else f"{settings}|parts={','.join(self.parts)}"

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        ids, masks = [], []
        for tokenizer, length in zip(self.tokenizers, (CLIP_LENGTH, CLIP_LENGTH, self.t5_max_length)):
            out = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            ids.append(out.input_ids)
            masks.append(out.attention_mask)
        return torch.cat(ids + masks, dim=1)

    def _split(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        lengths = (CLIP_LENGTH, CLIP_LENGTH, self.t5_max_length)
        pieces = list(torch.split(ids, lengths + lengths, dim=1))
        return pieces[:3], pieces[3:]

    def encode(self, ids: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        (l_ids, g_ids, t5_ids), (l_mask, g_mask, t5_mask) = self._split(ids)
        clip_l, clip_g, t5 = self.encoders
        out: dict[str, torch.Tensor] = {}
        for name, model, tokens, mask in (("l", clip_l, l_ids, l_mask), ("g", clip_g, g_ids, g_mask)):
            if name not in self.parts:
                continue
            result = model(tokens, attention_mask=mask if self.apply_lg_attn_mask else None, output_hidden_states=True)
            out[f"{name}_out"] = result.hidden_states[-2]
            out[f"{name}_pooled"] = result.text_embeds
        if "t5" in self.parts:
            out["t5_out"] = t5(t5_ids, attention_mask=t5_mask if self.apply_t5_attn_mask else None).last_hidden_state
        return out


class T5CachedText:
    """``--use_t5xxl_cache_only`` (sd3_train.py with ``--train_text_encoder``): CLIP-L and CLIP-G encode every
    caption at every step (they train), T5's outputs come from a cache (``t5``, a ``TextConditioner`` over the
    T5-only encoding) filled before training, after which T5 itself may be freed."""

    def __init__(self, clip: Any, t5: Any):
        self.clip, self.t5 = clip, t5

    @property
    def encoding(self) -> Any:
        return self.clip.encoding

    def encode(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        return {**self.clip.encode(captions, device), **self.t5(captions, device)}

    __call__ = encode


@dataclass(frozen=True)
class TextDropout:
    """sd-scripts' per-encoder caption dropout: each sample's CLIP-L, CLIP-G and T5 outputs are replaced by
    zeros with their own probability (on fresh and cached outputs alike), drawn from torch's global RNG (which
    a resumed run restores)."""

    rates: tuple[float, float, float]

    @property
    def active(self) -> bool:
        return any(r > 0 for r in self.rates)

    def __call__(self, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(cond)
        batch = out["t5_out"].shape[0]
        draws = torch.rand(batch, 3)
        for k, part in enumerate(PARTS):
            keep = (draws[:, k] >= self.rates[k]).float()
            for key in (f"{part}_out", f"{part}_pooled"):
                if key in out:
                    shape = (batch,) + (1,) * (out[key].dim() - 1)
                    out[key] = out[key] * keep.to(out[key].device, out[key].dtype).view(shape)
        return out


class DroppingConditioner:
    """A text conditioner whose outputs go through :class:`TextDropout` while the model trains."""

    def __init__(self, inner: Any, dropout: TextDropout):
        self.inner, self.dropout = inner, dropout
        self.training = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, captions: list[str], device: torch.device) -> Any:
        cond = self.inner(captions, device)
        return self.dropout(cond) if self.training else cond


def joint_context(cond: Mapping[str, torch.Tensor], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``encoder_hidden_states`` [B, 77 + L, width], ``pooled_projections`` [B, P]) from the encoder outputs."""
    lg = torch.cat([cond["l_out"], cond["g_out"]], dim=-1)
    lg = torch.nn.functional.pad(lg, (0, width - lg.shape[-1]))
    context = torch.cat([lg, cond["t5_out"].to(lg.dtype)], dim=-2)
    return context, torch.cat([cond["l_pooled"], cond["g_pooled"]], dim=-1)


def t5_cached_text(text: Any, models: Any, captions: list[str], device: torch.device, *, release: bool) -> T5CachedText:
    """``--use_t5xxl_cache_only``: T5's outputs of every caption of the run and every sample prompt computed now
    (and stored in ``text``'s disk cache folder with ``--cache_text_encoder_outputs_to_disk``), then T5 freed when
    ``release`` (no later save writes it); ``text`` is the loop's ``TextConditioner``."""
    import logging

    from library.models.weights import move_module
    from library.training.text_cache import TOKENIZATION_VERSION, TextConditioner, encoder_fingerprint

    t5_model = models.text_encoders[2]
    t5_encoding = text.encoding.only(("t5",))
    identity = ""
    if text.cache_dir is not None:
        identity = (f"{encoder_fingerprint(t5_model)}|tokenization={TOKENIZATION_VERSION}|"
                    f"{t5_encoding.cache_settings}|{next(t5_model.parameters()).dtype}")
    t5 = TextConditioner(t5_encoding, weighted=False, cache=True, cache_dir=text.cache_dir, identity=identity)
    t5.fill(captions, device)
    if release:
        move_module(t5_model, "meta")
        t5.encoders_released = True
    logging.getLogger(__name__).info("T5 outputs of %d texts cached (--use_t5xxl_cache_only)%s", len(captions),
                                     "; T5 freed" if release else "; T5 kept for the saved model")
    clip = TextConditioner(text.encoding.only(("l", "g")), weighted=False, cache=False)
    return T5CachedText(clip, t5)
