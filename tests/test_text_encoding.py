"""Tokenization windows, clip_skip and weighted captions on tiny SD1/SD2 text encoders."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.models.text_encoding import TextEncoding
from library.models.tiny import TinyConfig, build_tiny_components, write_clip_tokenizer

BOS, EOS = 49406, 49407
RED = 736
CAT = [BOS, 320, 1125, 539, 320, 2368, EOS]  # "a photo of a cat"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from transformers import CLIPTokenizer

    out = {}
    for sd2 in (False, True):
        folder = write_clip_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", sd2=sd2)
        te = build_tiny_components(TinyConfig(sd2=sd2))["text_encoder"].eval()
        out[sd2] = (CLIPTokenizer.from_pretrained(str(folder)), te)
    return out


def _enc(parts, sd2=False, **kw) -> TextEncoding:
    tokenizer, te = parts[sd2]
    return TextEncoding(tokenizer, te, v2=sd2, **kw)


@pytest.mark.parametrize("sd2", [False, True])
@pytest.mark.parametrize("length,windows", [(None, 1), (75, 1), (150, 2), (225, 3)])
def test_window_shapes_and_special_tokens(parts, sd2, length, windows):
    pad = 0 if sd2 else EOS
    enc = _enc(parts, sd2, max_token_length=length)
    long_caption = " ".join(["red"] * 100)
    ids = enc.tokenize(["a photo of a cat", long_caption])
    assert ids.shape == (2, windows, 77) and ids.dtype == torch.long
    assert (ids[:, :, 0] == BOS).all()
    assert ids[0, 0, :7].tolist() == CAT and (ids[0, 0, 7:] == pad).all()
    # a window cut inside the caption ends with EOS, whatever the padding
    assert ids[1, 0, 76].item() == EOS and (ids[1, 0, 1:76] == RED).all()
    if windows >= 2:
        # the second window holds words 76..100 then EOS, then padding
        assert (ids[1, 1, 1:26] == RED).all() and ids[1, 1, 26].item() == EOS
        assert (ids[1, 1, 27:] == pad).all()
        # an empty window: SD2 reads <BOS> <EOS> <PAD>..., SD1 <BOS> <EOS> <EOS>...
        assert ids[0, 1, :2].tolist() == [BOS, EOS] and (ids[0, 1, 2:] == pad).all()
    with torch.no_grad():
        hidden = enc.encode(ids)
    assert hidden.shape == (2, windows * 75 + 2, 32)


def test_windows_are_encoded_separately_and_joined(parts):
    enc1 = _enc(parts, max_token_length=None)
    enc2 = _enc(parts, max_token_length=150)
    caption = " ".join(["red"] * 100)
    ids = enc2.tokenize([caption])
    with torch.no_grad():
        joined = enc2.encode(ids)
        first = enc1.encode(ids[:, :1])
        second = enc1.encode(ids[:, 1:2])
    assert torch.equal(joined[:, :76], first[:, :76])  # BOS + body of window 1
    assert torch.equal(joined[:, 76:151], second[:, 1:76])  # body of window 2
    assert torch.equal(joined[:, 151], second[:, 76])  # the last window's end token


def test_clip_skip_changes_output_and_matches_hidden_state(parts):
    tokenizer, te = parts[False]
    ids = _enc(parts).tokenize(["a photo of a cat"])
    with torch.no_grad():
        plain = _enc(parts).encode(ids)
        skip1 = _enc(parts, clip_skip=1).encode(ids)
        skip2 = _enc(parts, clip_skip=2).encode(ids)
        expected = te.final_layer_norm(te(ids[:, 0], output_hidden_states=True).hidden_states[-2])
    torch.testing.assert_close(plain, skip1)
    assert not torch.allclose(plain, skip2)
    torch.testing.assert_close(skip2, expected)
    with pytest.raises(UserError, match="clip_skip 3"):
        _enc(parts, clip_skip=3)


def test_bad_max_token_length(parts):
    with pytest.raises(UserError, match="75, 150 or 225"):
        _enc(parts, max_token_length=100)


@pytest.mark.parametrize("sd2", [False, True])
def test_weighted_captions_scale_hidden_states(parts, sd2):
    enc = _enc(parts, sd2, max_token_length=150)
    ids, weights = enc.tokenize_weighted(["a (cat:1.5) on [a mat]"])
    plain_ids = enc.tokenize(["a cat on a mat"])
    assert torch.equal(ids, plain_ids)
    assert weights.shape == ids.shape
    assert weights[0, 0, :7].tolist() == pytest.approx([1.0, 1.0, 1.5, 1.0, 1 / 1.1, 1 / 1.1, 1.0])
    assert (weights[0, 0, 7:] == 1).all() and (weights[0, 1] == 1).all()
    with torch.no_grad():
        unweighted = enc.encode(ids)
        weighted = enc.encode(ids, weights)
    torch.testing.assert_close(weighted[0, 2], unweighted[0, 2] * 1.5)
    torch.testing.assert_close(weighted[0, 4], unweighted[0, 4] / 1.1)
    torch.testing.assert_close(weighted[0, 1], unweighted[0, 1])
    assert weighted.shape == (1, 152, 32)
