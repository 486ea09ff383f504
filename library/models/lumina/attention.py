"""``--use_flash_attn`` for the Lumina transformer: flash-attn kernels when the package is installed and the
model runs on CUDA, PyTorch SDPA otherwise (the choice is said once, at setup).

:class:`LuminaAttnProcessor` computes what diffusers' ``Lumina2AttnProcessor2_0`` computes (q/k norms, complex
rotary embedding, grouped key/value heads, the proportional softmax scale) and hands the product to
``flash_attn_func`` when there is no padding mask and the tensors are half precision; masked (mixed caption
lengths) or float32 calls take SDPA, so the numbers never depend on the kernel beyond rounding.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import torch
import torch.nn.functional as F


def flash_attn_available(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None


class LuminaAttnProcessor:
    """Lumina 2 attention with an optional flash-attn kernel (see the module docstring)."""

    def __init__(self, use_flash: bool):
        self.flash = None
        if use_flash:
            from flash_attn import flash_attn_func

            self.flash = flash_attn_func

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None,
                 base_sequence_length: int | None = None) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        batch, length, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        dtype, head_dim = query.dtype, query.shape[-1] // attn.heads
        kv_heads = key.shape[-1] // head_dim
        query = query.view(batch, -1, attn.heads, head_dim)
        key, value = key.view(batch, -1, kv_heads, head_dim), value.view(batch, -1, kv_heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=False)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)
        scale = attn.scale
        if base_sequence_length is not None:
            scale = math.sqrt(math.log(length, base_sequence_length)) * attn.scale
        if self.flash is not None and attention_mask is None and dtype in (torch.float16, torch.bfloat16):
            out = self.flash(query, key, value, softmax_scale=scale)  # [B, L, H, D], grouped k/v natively
        else:
            repeat = attn.heads // kv_heads
            key = key.unsqueeze(3).repeat(1, 1, 1, repeat, 1).flatten(2, 3)
            value = value.unsqueeze(3).repeat(1, 1, 1, repeat, 1).flatten(2, 3)
            mask = attention_mask.bool().view(batch, 1, 1, -1) if attention_mask is not None else None
            out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                                 attn_mask=mask, scale=scale).transpose(1, 2)
        out = out.reshape(batch, -1, attn.heads * head_dim).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def set_lumina_attention(transformer: torch.nn.Module, use_flash_attn: bool, device: torch.device | str) -> str:
    """Install the processor on every attention layer; returns the kernel's name for the log."""
    flash = use_flash_attn and flash_attn_available(device)
    from diffusers.models.attention_processor import Attention

    processor = LuminaAttnProcessor(flash)
    for module in transformer.modules():
        if isinstance(module, Attention):
            module.set_processor(processor)
    if use_flash_attn and not flash:
        return "sdpa (--use_flash_attn: flash-attn needs the flash_attn package and a CUDA device)"
    return "flash-attn" if flash else "sdpa"
