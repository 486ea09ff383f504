"""Text conditioning for the UNet: encode captions, or reuse earlier outputs of a frozen text encoder.

When the text encoder does not train and a caption is always the same text (no shuffle, dropout, token
warmup or wildcards), encoding it again every step is wasted work, so :class:`TextConditioner` keeps the
outputs in memory (and with ``--cache_text_encoder_outputs_to_disk`` in a folder of safetensors files).
Entries are keyed by the processed caption and the encoder's identity (weights fingerprint, clip skip,
token length, weighting), never by image path, so an edited caption can never reuse a stale entry.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from library.config.params import DatasetGroupParams
from library.io_utils import atomic_save_file
from library.models.weights import tensor_bytes

# Part of every disk cache identity; raised whenever the same caption may encode differently than before.
# 2: '!' in SD2/SDXL-TE2 captions is tokenised as OpenCLIP does, no longer as the pad id.
TOKENIZATION_VERSION = 2


def caption_variation_reasons(params: DatasetGroupParams) -> list[str]:
    """Why captions may differ from step to step (each reason names the subset); empty when they cannot."""
    reasons = []
    for dataset in params.datasets:
        for subset in dataset.subsets:
            where = subset.origin
            if subset.shuffle_caption:
                reasons.append(f"{where}: shuffle_caption")
            if subset.caption_dropout_rate > 0:
                reasons.append(f"{where}: caption_dropout_rate={subset.caption_dropout_rate}")
            if subset.caption_dropout_every_n_epochs > 0:
                reasons.append(f"{where}: caption_dropout_every_n_epochs={subset.caption_dropout_every_n_epochs}")
            if subset.caption_tag_dropout_rate > 0:
                reasons.append(f"{where}: caption_tag_dropout_rate={subset.caption_tag_dropout_rate}")
            if subset.token_warmup_step > 0:
                reasons.append(f"{where}: token_warmup_step={subset.token_warmup_step}")
            if subset.enable_wildcard:
                reasons.append(f"{where}: enable_wildcard")
    return reasons


def encoder_fingerprint(text_encoder: torch.nn.Module) -> str:
    """SHA-256 over the encoder's parameters (identifies the weights, whatever file they came from)."""
    h = hashlib.sha256()
    for name, tensor in sorted(text_encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class TextConditioner:
    """``encoder_hidden_states`` for a list of processed captions.

    ``encoding`` is a :class:`library.models.text_encoding.TextEncoding`. With ``cache=True`` the outputs
    are computed once per caption without gradient (only valid for a frozen encoder and fixed captions:
    the caller checks that); ``cache_dir`` adds a disk copy identified by ``identity``.
    """

    def __init__(self, encoding: Any, *, weighted: bool, cache: bool, cache_dir: str | Path | None = None,
                 identity: str = ""):
        self.encoding = encoding
        self.weighted = weighted
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.identity = identity
        self._memory: dict[str, torch.Tensor] = {}
        self.encoded = 0  # captions actually run through the encoder (for tests and the summary)
        self.encoders_released = False  # every caption of the run is cached and the encoders are gone

    def encode(self, captions: list[str], device: torch.device) -> torch.Tensor:
        """Run the encoder (gradient flows when its parameters require it)."""
        self.encoded += len(captions)
        if self.weighted:
            ids, weights = self.encoding.tokenize_weighted(captions)
            return self.encoding.encode(ids.to(device), weights.to(device))
        return self.encoding.encode(self.encoding.tokenize(captions).to(device))

    def fill(self, captions: list[str], device: torch.device, batch_size: int = 8,
             budget_bytes: int | None = None) -> bool:
        """Cache every caption of the run up front (then the text encoders are needed no more); returns whether
        the cache is on. With ``budget_bytes``, a cache that would outgrow it (projected from the first batch's
        outputs) is dropped instead and every batch is encoded as it comes."""
        keys = [self._key(c) for c in captions]
        todo = [c for c, k in zip(captions, keys) if k not in self._memory and not self._load(k)]
        for start in tqdm(range(0, len(todo), batch_size), desc="caching text encoder outputs",
                          disable=len(todo) <= batch_size):
            self(todo[start:start + batch_size], device)
            if start == 0 and budget_bytes is not None and self.nbytes() * len(captions) > budget_bytes * len(
                    self._memory):
                self._memory.clear()
                self.cache = False
                return False
        return self.cache

    def nbytes(self) -> int:
        """Bytes held by the in-memory cache."""
        return sum(tensor_bytes(entry.values() if isinstance(entry, Mapping) else [entry])
                   for entry in self._memory.values())

    def __call__(self, captions: list[str], device: torch.device) -> Any:
        if not self.cache:
            return self.encode(captions, device)
        keys = [self._key(c) for c in captions]
        missing = [i for i, k in enumerate(keys) if k not in self._memory and not self._load(k)]
        if missing and self.encoders_released:
            raise RuntimeError(f"caption {captions[missing[0]]!r} is not in the text-encoder cache filled before "
                               "training (the text encoders were released after it)")
        if missing:
            todo = list(dict.fromkeys(captions[i] for i in missing))
            with torch.no_grad():
                out = self.encode(todo, device)
            for i, caption in enumerate(todo):
                key = self._key(caption)
                self._memory[key] = _row(out, i)
                self._store(key, self._memory[key])
        return _stack([self._memory[k] for k in keys], device)

    def _key(self, caption: str) -> str:
        return hashlib.sha256(f"{self.identity}\0{caption}".encode("utf-8")).hexdigest()

    def _load(self, key: str) -> bool:
        if self.cache_dir is None:
            return False
        path = self.cache_dir / f"{key}.safetensors"
        if not path.is_file():
            return False
        data = load_file(str(path))
        self._memory[key] = data["hidden_states"] if set(data) == {"hidden_states"} else {
            k.removeprefix("cond."): v for k, v in data.items()}
        return True

    def _store(self, key: str, entry: Any) -> None:
        if self.cache_dir is None:
            return
        items = entry.items() if isinstance(entry, Mapping) else [("hidden_states", entry)]
        prefix = "cond." if isinstance(entry, Mapping) else ""
        data = {prefix + k: v.cpu().contiguous() for k, v in items}
        atomic_save_file(self.cache_dir / f"{key}.safetensors", lambda tmp: save_file(data, tmp))


def _row(out: Any, i: int) -> Any:
    """Caption ``i``'s part of an encoder output: a tensor, or a mapping of tensors (FLUX, SDXL)."""
    if isinstance(out, Mapping):
        return {k: v[i].detach() for k, v in out.items()}
    return out[i].detach()


def _stack(entries: list[Any], device: torch.device) -> Any:
    if isinstance(entries[0], Mapping):
        return {k: torch.stack([e[k].to(device) for e in entries]) for k in entries[0]}
    return torch.stack([e.to(device) for e in entries])
