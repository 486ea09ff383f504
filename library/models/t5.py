"""T5 text encoders (FLUX.1, SD3): the tokenizer found offline and the encoder config read from shapes.

Tokenizer lookup order: the model folder (``tokenizer_2/`` of a diffusers FLUX/SD3 folder, or the folder
itself); ``--tokenizer_cache_dir`` (``<dir>/google_t5-v1_1-xxl`` as sd-scripts stores it, ``<dir>/tokenizer_2``
or ``<dir>/t5``); the local Hugging Face cache of ``google/t5-v1_1-xxl``. Nothing is downloaded: when none
is found, one message says which files to put where.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

from library.errors import UserError

T5_TOKENIZER_ID = "google/t5-v1_1-xxl"
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def t5_tokenizer_candidates(model_dir: Path | None, cache_dir: Path | None) -> list[Path]:
    """Local folders tried, in order."""
    folders = []
    if model_dir is not None:
        folders += [model_dir / "tokenizer_2", model_dir]
    if cache_dir is not None:
        folders += [cache_dir / T5_TOKENIZER_ID.replace("/", "_"), cache_dir / "tokenizer_2", cache_dir / "t5"]
    return folders


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _real_vocabulary_size(tokenizer) -> int:
    """Tokens other than the 100 ``<extra_id_N>`` sentinels (transformers 5 makes those even from nothing)."""
    return sum(1 for token in tokenizer.get_vocab() if not token.startswith("<extra_id_"))


def _checked(tokenizer, where: str):
    """transformers 5 returns a near-empty tokenizer instead of failing on missing or incomplete files."""
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None or _real_vocabulary_size(tokenizer) < 50:
        raise UserError(f"{where}: not a complete T5 tokenizer ({len(tokenizer)} tokens, eos "
                        f"{tokenizer.eos_token!r}, pad {tokenizer.pad_token!r}); it needs spiece.model or "
                        "tokenizer.json from google/t5-v1_1-xxl")
    return tokenizer


def load_t5_tokenizer(*, model_dir: str | Path | None = None, cache_dir: str | Path | None = None):
    """The T5 tokenizer from local files only (see the module docstring for the order)."""
    from transformers import T5TokenizerFast

    model_dir = Path(model_dir) if model_dir is not None and Path(model_dir).is_dir() else None
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    tried = t5_tokenizer_candidates(model_dir, cache_dir)
    for folder in tried:
        if _has_tokenizer(folder):
            try:
                tokenizer = T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
            except Exception as err:  # transformers raises KeyError/TypeError/ValueError on damaged files
                raise UserError(f"{folder}: cannot read the T5 tokenizer there ({type(err).__name__}: {err}); "
                                "it needs spiece.model or tokenizer.json from google/t5-v1_1-xxl") from err
            return _checked(tokenizer, str(folder))
    try:
        tokenizer = T5TokenizerFast.from_pretrained(T5_TOKENIZER_ID, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is None or _real_vocabulary_size(tokenizer) < 50:
        where = "".join(f"\n  - {p}" for p in tried) or "\n  - (no --tokenizer_cache_dir given)"
        raise UserError(
            f"no T5 tokenizer found offline. Looked in:{where}\n"
            f"  - the Hugging Face cache for {T5_TOKENIZER_ID}\n"
            f"Fix: give --tokenizer_cache_dir DIR and put the tokenizer of {T5_TOKENIZER_ID} (spiece.model or "
            f"tokenizer.json, with tokenizer_config.json and special_tokens_map.json) in "
            f"DIR/{T5_TOKENIZER_ID.replace('/', '_')}; any T5 v1.1 / FLUX tokenizer_2 folder works. Nothing is "
            "downloaded during training."
        )
    return _checked(tokenizer, f"the Hugging Face cache of {T5_TOKENIZER_ID}")


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def is_t5_encoder(keys) -> bool:
    """True for HF ``T5EncoderModel`` weights (``encoder.block.*`` and ``shared.weight``)."""
    names = set(keys)
    return "encoder.block.0.layer.0.SelfAttention.q.weight" in names


def infer_t5_config(shapes: Mapping[str, Sequence[int]]):
    """``T5Config`` of an encoder-only T5 from its weight shapes (heads from the relative position bias)."""
    from transformers import T5Config

    vocab, d_model = shapes.get("shared.weight", shapes.get("encoder.embed_tokens.weight"))
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    d_ff = shapes["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"][0]
    return T5Config(
        vocab_size=int(vocab), d_model=int(d_model), d_ff=int(d_ff), num_heads=int(heads),
        d_kv=int(shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]) // int(heads),
        num_layers=_count(shapes, r"encoder\.block\.(\d+)\."), relative_attention_num_buckets=int(buckets),
        feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False, use_cache=False,
    )


def write_test_t5_tokenizer(folder: str | Path) -> Path:
    """A small synthetic T5-style (Unigram, ``</s>`` = 1, ``<pad>`` = 0) tokenizer for tests and demos.

    It is NOT the real T5 vocabulary (which cannot be bundled); a tiny model trained with it only works with it.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = ("a an the of and with on in at is photo picture painting drawing cat dog girl boy man woman red blue "
             "green white black sky tree house style art by shiny object").split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    vocab += [("▁" + w, -1.0) for w in words]
    for c in string.ascii_lowercase + string.digits + string.punctuation:
        vocab += [("▁" + c, -5.0), (c, -6.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    wrapped = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                              extra_ids=0)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(folder))
    return folder
