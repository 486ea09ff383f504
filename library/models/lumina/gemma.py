"""Gemma2 (Lumina's text encoder): recognising its files, the config read from shapes, loading, and the
tokenizer found offline.

``--gemma2`` is a ``.safetensors`` file (``gemma_2_2b_fp16.safetensors`` with or without the ``model.`` prefix,
Neta's ``text_encoders.gemma2_2b.transformer.model.``) or a transformers folder. The config is read from the
shapes with Gemma2's fixed head size 256 and the 2B model's other constants (soft-capping 50, sliding window
4096, query scale 256), as sd-scripts hard-codes them.

Tokenizer lookup order: the ``--gemma2`` folder (or its ``tokenizer/``), the diffusers model folder's
``tokenizer/``, ``--tokenizer_cache_dir`` (``DIR/google_gemma-2-2b``, ``DIR/tokenizer``, ``DIR/gemma2``), the
Hugging Face cache of ``google/gemma-2-2b``, and the hub only when it is reachable (``HF_HUB_OFFLINE`` unset);
otherwise one message names the files and the places.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import torch

from library.errors import UserError

GEMMA_ID = "google/gemma-2-2b"
GEMMA_HEAD_DIM = 256
_PREFIXES = ("text_encoders.gemma2_2b.transformer.model.", "model.")
_MARKER = "layers.0.pre_feedforward_layernorm.weight"  # Gemma2 only (Gemma1 has no pre/post feed-forward norm)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def is_gemma2(keys: Collection[str]) -> bool:
    return any(_strip(k) == _MARKER for k in keys)


def gemma2_config(shapes: Mapping[str, Sequence[int]]) -> Any:
    """``Gemma2Config`` of a Gemma2 encoder from its weight shapes (the ``model.`` prefix is ignored)."""
    from transformers import Gemma2Config

    shapes = {_strip(k): tuple(v) for k, v in shapes.items()}
    vocab, hidden = shapes["embed_tokens.weight"]
    layers = len({k.split(".")[1] for k in shapes if k.startswith("layers.")})
    return Gemma2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=shapes["layers.0.mlp.gate_proj.weight"][0],
        num_hidden_layers=layers, head_dim=GEMMA_HEAD_DIM,
        num_attention_heads=shapes["layers.0.self_attn.q_proj.weight"][0] // GEMMA_HEAD_DIM,
        num_key_value_heads=shapes["layers.0.self_attn.k_proj.weight"][0] // GEMMA_HEAD_DIM,
        query_pre_attn_scalar=GEMMA_HEAD_DIM, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        sliding_window=4096, max_position_embeddings=8192, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        pad_token_id=0, eos_token_id=1, bos_token_id=2, use_cache=False,
    )


def load_gemma2(path: str | Path, dtype: torch.dtype) -> Any:
    """``Gemma2Model`` from a ``.safetensors`` file or a transformers folder, in ``dtype``."""
    from transformers import Gemma2Model

    from library.models.weights import build_with_weights, read_weights

    path = Path(path).expanduser()
    if path.is_dir():
        return Gemma2Model.from_pretrained(str(path), torch_dtype=dtype).eval()
    state = {_strip(k): v for k, v in read_weights(path)[0].items() if not k.endswith("logit_scale")}
    state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    config = gemma2_config({k: tuple(v.shape) for k, v in state.items()})

    def adapt(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}

    return build_with_weights(lambda: Gemma2Model(config), state, str(path), dtype=dtype, adapt=adapt).eval()


def tokenizer_candidates(gemma2: str | None, model_dir: Path | None, cache_dir: str | None) -> list[Path]:
    """Local folders tried for the Gemma tokenizer, in order."""
    folders: list[Path] = []
    if gemma2 and Path(gemma2).expanduser().is_dir():
        folders += [Path(gemma2).expanduser(), Path(gemma2).expanduser() / "tokenizer"]
    if model_dir is not None:
        folders += [model_dir / "tokenizer"]
    if cache_dir:
        root = Path(cache_dir).expanduser()
        folders += [root / GEMMA_ID.replace("/", "_"), root / "tokenizer", root / "gemma2"]
    return folders


def _read(folder: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None or len(tokenizer) < 50:
        raise UserError(f"{folder}: not a complete Gemma tokenizer ({len(tokenizer)} tokens, pad "
                        f"{tokenizer.pad_token!r}); it needs tokenizer.json or tokenizer.model from {GEMMA_ID}")
    return tokenizer


def load_gemma_tokenizer(gemma2: str | None, model_dir: Path | None, cache_dir: str | None) -> Any:
    """The Gemma tokenizer (see the module docstring for the order); right padding as Lumina trains."""
    tried = tokenizer_candidates(gemma2, model_dir, cache_dir)
    for folder in tried:
        if folder.is_dir() and any((folder / name).is_file() for name in _TOKENIZER_FILES):
            try:
                return _read(str(folder), local_files_only=True)
            except UserError:
                raise
            except Exception as err:  # transformers raises many kinds on damaged files
                raise UserError(f"{folder}: cannot read the Gemma tokenizer there ({type(err).__name__}: {err})"
                                ) from err
    for local_only in (True, False):
        if not local_only and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            break
        try:
            return _read(GEMMA_ID, local_files_only=local_only, cache_dir=None)
        except UserError:
            raise
        except Exception:  # not cached / hub unreachable or gated: say what to do below
            continue
    where = "".join(f"\n  - {p}" for p in tried) or "\n  - (no --tokenizer_cache_dir given)"
    raise UserError(
        f"no Gemma tokenizer found. Looked in:{where}\n  - the Hugging Face cache for {GEMMA_ID}\n"
        f"  - the Hugging Face hub (offline, unreachable or not logged in for the gated {GEMMA_ID})\n"
        f"Fix: give --tokenizer_cache_dir DIR and put the tokenizer files of {GEMMA_ID} (tokenizer.json or "
        f"tokenizer.model, with tokenizer_config.json and special_tokens_map.json) in "
        f"DIR/{GEMMA_ID.replace('/', '_')}; the tokenizer/ folder of a diffusers Lumina2 model works too."
    )


def write_test_gemma_tokenizer(folder: str | Path) -> Path:
    """A small synthetic Gemma-style tokenizer (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2 added in front, right
    padding) for tests and demos. It is NOT Gemma's vocabulary; a tiny model trained with it only works with it."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ("a an the of and with on in at is photo picture painting drawing cat dog girl boy man woman red blue "
             "green white black sky tree house style art by shiny object you are assistant image prompt").split()
    vocab = [("<pad>", 0.0), ("<eos>", 0.0), ("<bos>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    vocab += [("▁" + w, -1.0) for w in words]
    for c in string.ascii_letters + string.digits + string.punctuation:
        vocab += [("▁" + c, -5.0), (c, -6.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " ")])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                      unk_token="<unk>", padding_side="right")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(folder))
    return folder
