"""Tiny random-weight LLaVA-OneVision and Qwen2.5-VL models saved as real transformers folders (model, byte-level
BPE tokenizer, image processor): the fixtures of the tests and of ``bench/bench_vlm.py --tiny``. They load through
the same code as the real checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
MERGES = [("Ġ", "a"), ("t", "h"), ("th", "e"), ("Ġ", "the"), ("o", "n"), ("i", "n"), ("e", "r"), ("a", "t"),
          ("Ġ", "s"), ("r", "e"), ("e", "s"), ("Ġ", "c"), ("o", "r"), ("l", "e")]


def build_tokenizer(special_tokens: Sequence[str] = SPECIAL_TOKENS, merges: Sequence[tuple[str, str]] = MERGES
                    ) -> tuple[Any, dict[str, int]]:
    """A byte-level BPE tokenizer with the Qwen special tokens (both families use Qwen2's tokenizer)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[i]: i for i in range(256)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for token in special_tokens:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(merges), unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tokenizer, {t: vocab[t] for t in special_tokens}


def _text_config(ids: dict[str, int], vocab_size: int, hidden: int, init: float, **extra: Any) -> dict[str, Any]:
    return dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=init,
                tie_word_embeddings=False, eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"],
                pad_token_id=ids["<|endoftext|>"], **extra)


def build_llava_onevision(ids: dict[str, int], vocab_size: int, *, init: float = 0.2, seed: int = 0):
    """SigLIP 32 px / patch 8 (16 tokens a tile), Qwen2 text hidden 32; grid pinpoints up to 64 px."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, patch_size=8,
                           image_size=32, num_hidden_layers=2, num_attention_heads=4, vision_use_head=False),
        text_config=dict(model_type="qwen2", **_text_config(ids, vocab_size, 32, init)),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"],
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]], vision_feature_select_strategy="full",
        vision_feature_layer=-1, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(config).eval()


def build_qwen2_5_vl(ids: dict[str, int], vocab_size: int, *, init: float = 0.2, seed: int = 0):
    """Vision hidden 32, depth 2, patch 14, merge 2; text hidden 64, 2 layers."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = Qwen2_5_VLConfig(
        text_config=_text_config(ids, vocab_size, 64, init, rope_parameters=rope),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], initializer_range=init),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def image_processor(family: str) -> Any:
    if family == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)

        return LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                               image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]])
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56})


def save_tiny_vlm(folder: str | Path, family: str, *, init: float = 0.2, seed: int = 0) -> Path:
    """Write a tiny ``family`` model (``llava_onevision`` or ``qwen2_5_vl``) with its tokenizer and image
    processor to ``folder``; returns the folder."""
    folder = Path(folder)
    tokenizer, ids = build_tokenizer()
    builder = {"llava_onevision": build_llava_onevision, "qwen2_5_vl": build_qwen2_5_vl}[family]
    model = builder(ids, len(tokenizer), init=init, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor(family).save_pretrained(folder)
    return folder
