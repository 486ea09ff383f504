"""The bundled CLIP BPE tokenizer (``library/models/tokenizers.py``) gives the token ids of
``openai/clip-vit-large-patch14``'s tokenizer and of OpenCLIP's ``SimpleTokenizer`` (SD2's and SDXL's second text
encoder), padding and truncation included. No hub, no extra package:

- openai's tokenizer is transformers' ``CLIPTokenizer`` over CLIP's vocabulary and merges with that repository's
  settings; the vocabulary and merges are derived here, independently of ``library.models.tiny``, from the BPE
  file both ship (``bpe_simple_vocab_16e6.txt.gz``, byte-identical to the one in the open-clip-torch 3.3.0 wheel);
- OpenCLIP's tokenizer is re-implemented here from its algorithm (``open_clip/tokenizer.py``: clean, lower-case,
  split by its pattern, byte-level BPE by merge rank; ``[sot] + ids + [eot]``, cut to 77 with ``eot`` last, padded
  with 0). Its ``ftfy.fix_text`` is left out (ftfy is not a dependency): the texts are ones ftfy leaves unchanged.
  That this reference equals the real ``open_clip.tokenizer`` on these texts was checked once by running
  open-clip-torch 3.3.0's ``tokenizer.py`` with ftfy 6.3.1 (docs/models.md, "Where each CLIP tokenizer comes
  from").
"""

from __future__ import annotations

import gzip
import hashlib
import html
from pathlib import Path

import pytest
import regex

from library.models.tiny import BPE_VOCAB

#: sha256 of the bundled file = open-clip-torch 3.3.0's ``open_clip/bpe_simple_vocab_16e6.txt.gz``
BUNDLED_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
CONTEXT = 77

TEXTS = [
    "a photo of a cat",
    "A PHOTO of a CAT!",
    "masterpiece, best quality, 1girl, solo, long_hair, looking_at_viewer, smile, blue eyes",
    "(masterpiece:1.2), [bad hands], {dramatic lighting}, <lora:style:0.8>",
    "sks dog sitting on a red couch, 4k, 8K, 35mm f/1.8, ISO-200",
    "It's a dog's life; they're sure we'll go, I'd say, you've won, I'm here",
    "portrait of Amélie in a café, naïve façade, Zürich, São Paulo, Ærøskøbing",
    "東京タワー at night, 猫, 고양이, кошка, γάτα, قطة",
    "emoji 🐱🐶👍🏽 and symbols ©®™ ± × ÷ → ∞ °C",
    "numbers 12345 3.14159 -42 1,000,000 2026-12-03 12:34",
    "  tabs\tand\nnewlines   and    spaces  ",
    "https://example.com/path?q=1&x=y#frag user@mail.org",
    "hyphen-ated, snake_case, camelCase, UPPER_SNAKE, dot.separated, slash/separated",
    "!!!??? ... --- *** ### $$$ %%% ^^^ &&& ''' \"\"\" ``` ~~~",
    "",
    " ".join(f"word{i} token" for i in range(60)),  # far beyond 77 tokens: truncation
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
]


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) map of the 256 bytes to printable characters, from its definition."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merges() -> list[tuple[str, str]]:
    lines = gzip.open(BPE_VOCAB, "rt", encoding="utf-8").read().split("\n")
    return [tuple(line.split()) for line in lines[1:48895]]  # 48,894 merges after the version line


def _vocabulary(merges: list[tuple[str, str]]) -> list[str]:
    chars = list(_bytes_to_unicode().values())  # in the map's order: the printable bytes first, as CLIP's
    return chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]


class OpenCLIPReference:
    """OpenCLIP's ``SimpleTokenizer`` (``clean="lower"``) and its ``__call__`` padding rules, without ftfy."""

    def __init__(self) -> None:
        merges = _merges()
        vocab = _vocabulary(merges) + ["<start_of_text>", "<end_of_text>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.sot, self.eot = self.encoder["<start_of_text>"], self.encoder["<end_of_text>"]
        self.pattern = regex.compile(r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                                     r"[^\s\p{L}\p{N}]+", regex.IGNORECASE)
        self.byte_map = _bytes_to_unicode()

    def _bpe(self, token: str) -> list[str]:
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        text = html.unescape(html.unescape(text)).strip()
        text = " ".join(text.split()).lower()
        ids = []
        for piece in self.pattern.findall(text):
            mapped = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[t] for t in self._bpe(mapped)]
        return ids

    def __call__(self, text: str, context: int = CONTEXT) -> list[int]:
        tokens = [self.sot, *self.encode(text), self.eot]
        if len(tokens) > context:
            tokens = tokens[:context]
            tokens[-1] = self.eot
        return tokens + [0] * (context - len(tokens))


@pytest.fixture(scope="module")
def ours():
    """What the loaders return offline: SD1 / SDXL TE1 (pads with <|endoftext|>), SD2 / SDXL TE2 (pads with !)."""
    from library.models.tokenizers import SDXL_TOKENIZERS, load_clip_tokenizer

    return [load_clip_tokenizer(spec, model_dir=Path("/nonexistent"), cache_dir=None) for spec in SDXL_TOKENIZERS]


@pytest.fixture(scope="module")
def openai_reference():
    """transformers' CLIPTokenizer with openai/clip-vit-large-patch14's vocabulary, merges and settings."""
    from transformers import CLIPTokenizer

    merges = _merges()
    vocab = _vocabulary(merges) + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=CONTEXT)


def test_the_bundled_bpe_file_is_openclips():
    assert hashlib.sha256(Path(BPE_VOCAB).read_bytes()).hexdigest() == BUNDLED_BPE_SHA256
    merges = _merges()
    assert len(merges) == 48894 and len(_vocabulary(merges)) + 2 == 49408
    assert merges[0] == ("i", "n")


def test_ids_equal_openai_clip_vit_large_patch14(ours, openai_reference):
    te1, te2 = ours
    for text in TEXTS:
        expected = openai_reference(text).input_ids
        assert te1(text).input_ids == expected, text
        assert te2(text).input_ids == expected, text  # the same vocabulary; only the padding differs
        padded = openai_reference(text, padding="max_length", max_length=CONTEXT, truncation=True).input_ids
        assert te1(text, padding="max_length", max_length=CONTEXT, truncation=True).input_ids == padded, text
    assert te1("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # published ids
    assert te1.pad_token_id == 49407 and len(te1) == 49408
    assert te1.get_vocab() == te2.get_vocab() == openai_reference.get_vocab()


def test_ids_and_padding_equal_openclip(ours):
    reference = OpenCLIPReference()
    _, te2 = ours
    assert te2.pad_token == "!" and te2.pad_token_id == 0
    for text in TEXTS:
        theirs = reference(text)
        mine = te2(text, padding="max_length", max_length=CONTEXT, truncation=True).input_ids
        assert mine == theirs, text
    long = reference(TEXTS[-2])
    assert long[-1] == reference.eot and 0 not in long  # cut to 77, end-of-text kept last
    assert reference("a cat")[:6] == [49406, 320, 2368, 49407, 0, 0]


def test_an_exclamation_mark_is_bpe_not_padding(ours, tmp_path):
    """``!`` (id 0) pads SD2/SDXL-TE2 sequences but is never matched in the text as a token of its own: a caption's
    ``!`` keeps its BPE ids (``!</w>`` 256, ``!!</w>`` 748), as OpenCLIP gives them, also when the tokenizer files
    name ``!`` as the pad token."""
    from library.models.tiny import write_clip_tokenizer
    from library.models.tokenizers import SDXL_TOKENIZERS, load_clip_tokenizer

    _, te2 = ours
    expected = OpenCLIPReference()("wow! a cat!!")[:7]
    assert expected == [49406, 2781, 256, 320, 2368, 748, 49407]
    assert te2("wow! a cat!!").input_ids == expected
    folder = write_clip_tokenizer(tmp_path / "tokenizer_2", sd2=True)  # as SDXL's tokenizer_2/ config: pad "!"
    from_files = load_clip_tokenizer(SDXL_TOKENIZERS[1], model_dir=folder.parent)
    assert from_files("wow! a cat!!").input_ids == expected and from_files.pad_token_id == 0


def test_html_entities_are_where_openclip_differs(ours):
    """OpenCLIP unescapes HTML entities (and its ftfy straightens curly quotes, ligatures and full-width letters)
    before tokenizing; transformers' tokenizer (openai's, and the one SD/SDXL trainers use) does not. Ours is
    transformers'."""
    te1, _ = ours
    reference = OpenCLIPReference()
    escaped = te1("tom &amp; jerry").input_ids
    assert escaped != reference("tom &amp; jerry")[:len(escaped)]
    plain = te1("tom & jerry").input_ids
    assert plain == reference("tom &amp; jerry")[:len(plain)]
