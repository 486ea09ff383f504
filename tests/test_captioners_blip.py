"""BLIP captioner (finetune/make_captions.py) with a tiny random-weight model built in the test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.tools import blip_captioner as bc

REPO_ROOT = Path(__file__).resolve().parent.parent
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]", "a", "picture", "of", "cat", "dog", "on",
         "the", "grass", "red", "blue", "sitting", "with", "an", "image", "man", "woman", "tree", "sky", "."]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    vocab = {w: i for i, w in enumerate(WORDS)}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]")
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=96, bos_token_id=vocab["[DEC]"],
                         sep_token_id=vocab["[SEP]"], pad_token_id=0, eos_token_id=vocab["[SEP]"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=0.02),
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # let the image steer the text, so different images get different captions
        for name, param in model.text_decoder.named_parameters():
            if "crossattention" in name and ("value" in name or "output.dense" in name) and param.dim() == 2:
                param.mul_(10.0)
        model.text_decoder.cls.predictions.decoder.weight.mul_(10.0)
    folder = tmp_path_factory.mktemp("blip") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name, size, colour in [("a.png", (64, 48), (255, 0, 0)), ("b.jpg", (40, 80), (0, 0, 255)),
                               ("c.png", (50, 50), (0, 255, 0))]:
        Image.new("RGB", size, colour).save(folder / name)
    return folder


def caption(images: Path, model: Path, *extra: str) -> None:
    bc.run(bc.build_parser().parse_args([str(images), "--model_id", str(model), "--max_length", "12", *extra]))


def captions(images: Path, extension: str = ".caption") -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(images.rglob(f"*{extension}"))}


def test_beam_search_deterministic_and_batch_independent(images, blip_dir):
    caption(images, blip_dir, "--beam_search", "--num_beams", "3")
    first = captions(images)
    assert sorted(first) == ["a.caption", "b.caption", "c.caption"]
    assert all(text.endswith("\n") and text.strip() for text in first.values())
    assert not any(text.startswith("a picture of") for text in first.values())  # the prompt is removed
    caption(images, blip_dir, "--beam_search", "--num_beams", "3", "--batch_size", "2", "--overwrite")
    assert captions(images) == first
    assert len(set(first.values())) > 1


def test_sampling_repeatable_with_the_seed(images, blip_dir, capsys):
    caption(images, blip_dir, "--batch_size", "2", "--caption_extension", ".s1")
    caption(images, blip_dir, "--batch_size", "2", "--caption_extension", ".s2", "--num_beams", "3")
    assert "--num_beams 3 is not used" in capsys.readouterr().out  # sampling, as without it
    caption(images, blip_dir, "--batch_size", "2", "--caption_extension", ".s3", "--seed", "7", "--top_p", "1.0")
    one, two, three = captions(images, ".s1"), captions(images, ".s2"), captions(images, ".s3")
    assert list(one.values()) == list(two.values())
    assert list(one.values()) != list(three.values())


def test_length_limits(images, blip_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(blip_dir))
    caption(images, blip_dir, "--beam_search", "--min_length", "6", "--max_length", "6")
    short = captions(images)
    caption(images, blip_dir, "--beam_search", "--min_length", "14", "--max_length", "14", "--overwrite")
    long = captions(images)
    for name in short:
        # max_length counts [DEC] + "a picture of" (4 tokens) + the caption
        n_short = len(tokenizer(short[name].strip(), add_special_tokens=False).input_ids)
        n_long = len(tokenizer(long[name].strip(), add_special_tokens=False).input_ids)
        assert 1 <= n_short <= 2 and n_short < n_long <= 10


def test_skip_existing_overwrite_extension_and_recursive(images, blip_dir, image_factory):
    (images / "a.caption").write_text("kept\n", encoding="utf-8")
    image_factory(images / "sub" / "d.png", (30, 30), seed=5)
    caption(images, blip_dir, "--beam_search")
    assert (images / "a.caption").read_text(encoding="utf-8") == "kept\n"
    assert not (images / "sub" / "d.caption").exists()
    caption(images, blip_dir, "--beam_search", "--recursive", "--caption_extention", ".txt")
    assert (images / "sub" / "d.txt").is_file() and (images / "a.txt").is_file()
    caption(images, blip_dir, "--beam_search", "--overwrite")
    assert (images / "a.caption").read_text(encoding="utf-8") != "kept\n"


def test_unreadable_image_reported(images, blip_dir, capsys):
    (images / "zz.jpg").write_bytes(b"garbage")
    caption(images, blip_dir, "--beam_search", "--debug")
    out = capsys.readouterr().out
    assert "zz.jpg" in out and "cannot read" in out
    assert f"{images / 'a.png'}: " in out  # --debug prints each caption
    assert sorted(captions(images)) == ["a.caption", "b.caption", "c.caption"]


@pytest.mark.parametrize("extra, message", [
    (["--caption_weights", "model_large_caption.pth"], "original Salesforce .pth"),
    (["--model_id", "Salesforce/blip-image-captioning-large"], "not in the local Hugging Face cache"),
    (["--model_id", "not-a-folder"], "neither a model folder nor a Hugging Face id"),
    (["--min_length", "20"], "longer than --max_length"),
    (["--top_p", "0"], "--top_p"),
    (["--num_beam", "x"], None),
    (["--model_id", "."], "not a complete transformers BLIP captioning model folder"),
    (["--model_id", "{truncated}"], "not a complete transformers BLIP captioning model folder"),
])
def test_user_errors(images, blip_dir, monkeypatch, extra, message, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(images / "empty_hf_home"))
    if "{truncated}" in extra:  # the model folder with its weights file cut short
        truncated = tmp_path / "truncated"
        truncated.mkdir()
        for f in blip_dir.iterdir():
            data = f.read_bytes()
            (truncated / f.name).write_bytes(data[:1000] if f.suffix == ".safetensors" else data)
        extra = [str(truncated) if e == "{truncated}" else e for e in extra]
    argv = [str(images), "--model_id", str(blip_dir), "--max_length", "12", *extra]
    if message is None:  # argparse abbreviations stay accepted, bad values are a parser error
        with pytest.raises(UserError, match="see --help"):
            bc.build_parser().parse_args(argv)
        return
    with pytest.raises(UserError, match=message):
        bc.run(bc.build_parser().parse_args(argv))


def test_script_runs_from_repo_root(images, blip_dir):
    cmd = [sys.executable, "finetune/make_captions.py", str(images), "--model_id", str(blip_dir), "--beam_search",
           "--max_length", "8"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "3 captions written" in result.stdout
    assert sorted(captions(images)) == ["a.caption", "b.caption", "c.caption"]
