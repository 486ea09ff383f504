"""CLIP tokenizers, found offline.

Lookup order: the model folder's ``tokenizer/``; ``--tokenizer_cache_dir`` (``<dir>/<hub id with / as _>``
as sd-scripts stores it, ``<dir>/tokenizer`` or ``<dir>`` itself); the local Hugging Face cache
(``openai/clip-vit-large-patch14`` for SD1, ``stabilityai/stable-diffusion-2`` subfolder ``tokenizer`` for
SD2). Nothing is downloaded.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from library.errors import UserError
from library.models.families import ModelFamily

logger = logging.getLogger(__name__)

SD1_TOKENIZER_ID = "openai/clip-vit-large-patch14"
SD2_TOKENIZER_ID = "stabilityai/stable-diffusion-2"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
CLIP_VOCAB_SIZE = 49408


def _hub_source(family: ModelFamily) -> tuple[str, str | None]:
    return (SD2_TOKENIZER_ID, "tokenizer") if family.name == "sd2" else (SD1_TOKENIZER_ID, None)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def tokenizer_candidates(family: ModelFamily, model_dir: Path | None, cache_dir: Path | None) -> list[Path]:
    """Local folders tried, in order."""
    hub_id, _ = _hub_source(family)
    folders = []
    if model_dir is not None:
        folders.append(model_dir / "tokenizer")
    if cache_dir is not None:
        folders += [cache_dir / hub_id.replace("/", "_"), cache_dir / "tokenizer", cache_dir]
    return folders


def _is_clip_vocabulary(tokenizer) -> bool:
    """transformers 5 returns an empty 2-token tokenizer instead of failing when the files are missing."""
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return len(tokenizer) >= CLIP_VOCAB_SIZE and tokenizer.eos_token_id == eos


def _finish(tokenizer, family: ModelFamily):
    """SD2 (OpenCLIP) pads with ``!`` (id 0); SD1 pads with ``<|endoftext|>``."""
    if family.name == "sd2" and tokenizer.pad_token_id != 0:
        tokenizer.pad_token = "!"
    return tokenizer


def load_tokenizer(family: ModelFamily, *, model_dir: str | Path | None = None, cache_dir: str | Path | None = None):
    """The ``CLIPTokenizer`` for ``family``, from local files only (see the module docstring for the order).

    A tokenizer found only in the Hugging Face cache is also copied to ``cache_dir`` when given, as
    sd-scripts does, so that the run works without that cache later.
    """
    from transformers import CLIPTokenizer

    model_dir = Path(model_dir) if model_dir is not None else None
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    tried = tokenizer_candidates(family, model_dir, cache_dir)
    for folder in tried:
        if folder.is_dir() and _has_tokenizer(folder):
            try:
                tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
            except (OSError, ValueError) as err:
                raise UserError(f"{folder}: cannot read the tokenizer there ({err})") from err
            if not _is_clip_vocabulary(tokenizer):
                raise UserError(
                    f"{folder}: not a complete CLIP tokenizer ({len(tokenizer)} tokens); it needs vocab.json + "
                    "merges.txt or tokenizer.json with the 49,408-token CLIP vocabulary"
                )
            return _finish(tokenizer, family)
    hub_id, subfolder = _hub_source(family)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(hub_id, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is None or not _is_clip_vocabulary(tokenizer):
        where = "".join(f"\n  - {p}" for p in tried)
        hub = f"{hub_id}" + (f" (subfolder {subfolder})" if subfolder else "")
        raise UserError(
            f"no {family.name.upper()} tokenizer found offline. Looked in:{where}\n"
            f"  - the Hugging Face cache for {hub}\n"
            f"Fix: give --tokenizer_cache_dir DIR and copy a tokenizer folder (vocab.json + merges.txt or "
            f"tokenizer.json) to DIR/{hub_id.replace('/', '_')}, or use a diffusers model folder that has "
            f"tokenizer/, or download {hub} into the Hugging Face cache on a machine with internet."
        )
    if cache_dir is not None:
        try:
            _copy_to_cache(tokenizer, cache_dir / hub_id.replace("/", "_"))
        except OSError as err:
            logger.warning("could not copy the tokenizer to %s: %s", cache_dir, err)
    return _finish(tokenizer, family)


def _copy_to_cache(tokenizer, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
