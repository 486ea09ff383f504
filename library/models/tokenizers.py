"""CLIP tokenizers, found offline.

Lookup order: the model folder's ``tokenizer/`` (``tokenizer_2/`` for SDXL's second encoder);
``--tokenizer_cache_dir`` (``<dir>/<hub id with / as _>`` as sd-scripts stores it, ``<dir>/tokenizer`` or
``<dir>`` itself); the local Hugging Face cache (``openai/clip-vit-large-patch14`` for SD1 and SDXL's
first encoder, ``stabilityai/stable-diffusion-2`` subfolder ``tokenizer`` for SD2,
``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k`` for SDXL's second); last, the CLIP BPE vocabulary bundled
in ``library/models/assets`` (every one of these tokenizers is that vocabulary; they differ only in the
padding token). Nothing is downloaded.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError
from library.models.families import ModelFamily

logger = logging.getLogger(__name__)

SD1_TOKENIZER_ID = "openai/clip-vit-large-patch14"
SD2_TOKENIZER_ID = "stabilityai/stable-diffusion-2"
SDXL_TE2_TOKENIZER_ID = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
CLIP_VOCAB_SIZE = 49408


@dataclass(frozen=True)
class ClipTokenizerSpec:
    """Where one CLIP tokenizer is looked for, and how it pads (``!``, id 0, for OpenCLIP encoders)."""

    label: str
    hub_id: str
    hub_subfolder: str | None = None
    model_subfolder: str = "tokenizer"
    pad_zero: bool = False


SD1_TOKENIZER = ClipTokenizerSpec("SD1", SD1_TOKENIZER_ID)
SD2_TOKENIZER = ClipTokenizerSpec("SD2", SD2_TOKENIZER_ID, "tokenizer", pad_zero=True)
SDXL_TOKENIZERS = (
    ClipTokenizerSpec("SDXL text encoder 1", SD1_TOKENIZER_ID),
    ClipTokenizerSpec("SDXL text encoder 2", SDXL_TE2_TOKENIZER_ID, model_subfolder="tokenizer_2", pad_zero=True),
)


def _family_spec(family: ModelFamily) -> ClipTokenizerSpec:
    return SD2_TOKENIZER if family.name == "sd2" else SD1_TOKENIZER


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _candidates(spec: ClipTokenizerSpec, model_dir: Path | None, cache_dir: Path | None) -> list[Path]:
    folders = []
    if model_dir is not None:
        folders.append(model_dir / spec.model_subfolder)
    if cache_dir is not None:
        folders += [cache_dir / spec.hub_id.replace("/", "_"), cache_dir / "tokenizer", cache_dir]
    return folders


def tokenizer_candidates(family: ModelFamily, model_dir: Path | None, cache_dir: Path | None) -> list[Path]:
    """Local folders tried, in order."""
    return _candidates(_family_spec(family), model_dir, cache_dir)


def _is_clip_vocabulary(tokenizer) -> bool:
    """transformers 5 returns an empty 2-token tokenizer instead of failing when the files are missing."""
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return len(tokenizer) >= CLIP_VOCAB_SIZE and tokenizer.eos_token_id == eos


def _finish(tokenizer, spec: ClipTokenizerSpec):
    """OpenCLIP encoders (SD2, SDXL's second) pad with ``!`` (id 0); CLIP ViT-L pads with ``<|endoftext|>``.

    Only the pad id is set: ``!`` must not be a registered (added) token. transformers matches added tokens in
    the text before BPE, so every ``!`` of a caption would become id 0 instead of its BPE ids (``!</w>`` 256,
    ``!!</w>`` 748), unlike OpenCLIP. Tokenizer files that name ``!`` as pad token (SD2's, SDXL's
    ``tokenizer_2``) register it; such a tokenizer is rebuilt from its vocabulary and merges without it."""
    if spec.pad_zero:
        if "!" in tokenizer.get_added_vocab():
            tokenizer = _without_added_tokens(tokenizer)
        tokenizer.pad_token_id = 0
    return tokenizer


def _without_added_tokens(tokenizer):
    """The same CLIP BPE (vocabulary, merges, length limit) with only the two special tokens added."""
    import json

    from transformers import CLIPTokenizer

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=tokenizer.model_max_length)


def bundled_clip_tokenizer(pad_zero: bool = False):
    """The CLIP tokenizer built from the bundled BPE vocabulary (no files needed besides the package)."""
    from transformers import CLIPTokenizer

    from library.models.tiny import write_clip_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="clip-tokenizer-"))
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp)), local_files_only=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if pad_zero:
        tokenizer.pad_token_id = 0  # ``!``, as OpenCLIP pads (see ``_finish``)
    return tokenizer


def load_clip_tokenizer(spec: ClipTokenizerSpec, *, model_dir: str | Path | None = None,
                        cache_dir: str | Path | None = None, bundled_fallback: bool = True):
    """The ``CLIPTokenizer`` of ``spec``, from local files only (see the module docstring for the order).

    A tokenizer found only in the Hugging Face cache is also copied to ``cache_dir`` when given, as
    sd-scripts does, so that the run works without that cache later.
    """
    from transformers import CLIPTokenizer

    model_dir = Path(model_dir) if model_dir is not None else None
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    tried = _candidates(spec, model_dir, cache_dir)
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
            return _finish(tokenizer, spec)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(spec.hub_id, subfolder=spec.hub_subfolder, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is None or not _is_clip_vocabulary(tokenizer):
        if bundled_fallback:
            return _finish(bundled_clip_tokenizer(spec.pad_zero), spec)
        where = "".join(f"\n  - {p}" for p in tried)
        hub = f"{spec.hub_id}" + (f" (subfolder {spec.hub_subfolder})" if spec.hub_subfolder else "")
        raise UserError(
            f"no {spec.label} tokenizer found offline. Looked in:{where}\n"
            f"  - the Hugging Face cache for {hub}\n"
            f"Fix: give --tokenizer_cache_dir DIR and copy a tokenizer folder (vocab.json + merges.txt or "
            f"tokenizer.json) to DIR/{spec.hub_id.replace('/', '_')}, or use a diffusers model folder that has "
            f"{spec.model_subfolder}/, or download {hub} into the Hugging Face cache on a machine with internet."
        )
    if cache_dir is not None:
        try:
            _copy_to_cache(tokenizer, cache_dir / spec.hub_id.replace("/", "_"))
        except OSError as err:
            logger.warning("could not copy the tokenizer to %s: %s", cache_dir, err)
    return _finish(tokenizer, spec)


def load_tokenizer(family: ModelFamily, *, model_dir: str | Path | None = None, cache_dir: str | Path | None = None):
    """The ``CLIPTokenizer`` of an SD1.x/SD2.x ``family`` (see :func:`load_clip_tokenizer`)."""
    return load_clip_tokenizer(_family_spec(family), model_dir=model_dir, cache_dir=cache_dir)


def _copy_to_cache(tokenizer, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
