"""Tiny random-weight Lumina Image 2.0 models for tests, demos and benchmarks.

The same module names and block types as Lumina 2 (``Lumina2Transformer2DModel``: 2 layers, 1 refiner layer
of each kind, width 48 with 2 query heads of 24 and 1 key/value head), a tiny ``Gemma2Model`` (width 32, 2
layers, Gemma2's head size 256) with a synthetic Gemma-style tokenizer, and the tiny 16-channel FLUX AE.
Saved as the files people download (``lumina.safetensors`` in the Next-DiT layout, ``gemma2.safetensors``
with the ``model.`` prefix, ``ae.safetensors`` with LDM names, a tokenizer folder) or as a diffusers
``Lumina2Pipeline`` folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from library.io_utils import atomic_write_json
from library.models.lumina.conversion import LuminaArchitecture, diffusers_to_nextdit
from library.models.lumina.gemma import GEMMA_HEAD_DIM, GEMMA_ID, write_test_gemma_tokenizer


@dataclass(frozen=True)
class TinyLuminaConfig:
    """Sizes of a tiny Lumina 2."""

    hidden: int = 48
    heads: int = 2
    kv_heads: int = 1
    layers: int = 2
    refiner_layers: int = 1
    gemma_width: int = 32
    gemma_layers: int = 2

    def architecture(self) -> LuminaArchitecture:
        return LuminaArchitecture(
            hidden_size=self.hidden, num_layers=self.layers, num_refiner_layers=self.refiner_layers,
            num_heads=self.heads, num_kv_heads=self.kv_heads, ffn_hidden=4 * self.hidden, in_channels=16,
            patch_size=2, cap_feat_dim=self.gemma_width,
        )

    def gemma_config(self, vocab_size: int) -> Any:
        from transformers import Gemma2Config

        return Gemma2Config(
            vocab_size=vocab_size, hidden_size=self.gemma_width, intermediate_size=2 * self.gemma_width,
            num_hidden_layers=self.gemma_layers, num_attention_heads=1, num_key_value_heads=1,
            head_dim=GEMMA_HEAD_DIM, query_pre_attn_scalar=GEMMA_HEAD_DIM, attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0, sliding_window=4096, max_position_embeddings=8192, rms_norm_eps=1e-6,
            hidden_activation="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1, bos_token_id=2, use_cache=False,
        )


def build_tiny_lumina(config: TinyLuminaConfig = TinyLuminaConfig(), seed: int = 0, vocab_size: int = 256
                      ) -> dict[str, Any]:
    """Random-weight ``transformer``, ``ae`` and ``gemma2`` modules (float32)."""
    from diffusers import AutoencoderKL, Lumina2Transformer2DModel
    from transformers import Gemma2Model

    from library.models.flux.tiny import TinyFluxConfig

    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(**config.architecture().diffusers_config())
    with torch.no_grad():  # zero-initialised layers would make conversion and LoRA tests unable to fail
        for p in transformer.parameters():
            if not p.abs().any():
                p.normal_(0.0, 0.02)
    ae = AutoencoderKL(**TinyFluxConfig().ae_config())
    gemma2 = Gemma2Model(config.gemma_config(vocab_size)).eval()
    return {"transformer": transformer, "ae": ae, "gemma2": gemma2}


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


def _tokenizer_vocab(folder: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))


def save_tiny_lumina_files(folder: str | Path, config: TinyLuminaConfig = TinyLuminaConfig(), seed: int = 0
                           ) -> dict[str, Path]:
    """Write ``lumina.safetensors`` (Next-DiT layout), ``gemma2.safetensors``, ``ae.safetensors`` and a
    ``tokenizers/`` folder to pass as ``--tokenizer_cache_dir``; returns the paths by role."""
    from library.models.ldm_conversion import vae_diffusers_to_ldm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / "tokenizers"
    vocab = _tokenizer_vocab(write_test_gemma_tokenizer(cache / GEMMA_ID.replace("/", "_")))
    parts = build_tiny_lumina(config, seed, vocab)
    paths = {name: folder / f"{name}.safetensors" for name in ("lumina", "gemma2", "ae")}
    save_file(_contiguous(diffusers_to_nextdit(parts["transformer"].state_dict())), str(paths["lumina"]))
    save_file(_contiguous({"model." + k: v for k, v in parts["gemma2"].state_dict().items()}), str(paths["gemma2"]))
    save_file(_contiguous(vae_diffusers_to_ldm(parts["ae"].state_dict())), str(paths["ae"]))
    paths["tokenizer_cache_dir"] = cache
    return paths


def save_tiny_lumina_diffusers(folder: str | Path, config: TinyLuminaConfig = TinyLuminaConfig(), seed: int = 0
                               ) -> Path:
    """The same tiny model as a diffusers ``Lumina2Pipeline`` folder (``Lumina2Pipeline.from_pretrained`` reads it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    vocab = _tokenizer_vocab(write_test_gemma_tokenizer(folder / "tokenizer"))
    parts = build_tiny_lumina(config, seed, vocab)
    parts["transformer"].save_pretrained(folder / "transformer", safe_serialization=True)
    parts["ae"].save_pretrained(folder / "vae", safe_serialization=True)
    parts["gemma2"].save_pretrained(folder / "text_encoder", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(shift=6.0).save_pretrained(folder / "scheduler")
    atomic_write_json(folder / "model_index.json", {
        "_class_name": "Lumina2Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Gemma2Model"], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "Lumina2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    })
    return folder
