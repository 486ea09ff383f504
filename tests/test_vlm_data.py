"""VLM data: the lmms-finetune JSON / JSONL format and its checks, caption folders, and the encoding of
conversations (assistant-only labels, image-token accounting, too-long samples, prompts without the answer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from library.errors import UserError
from library.vlm.data import DataOptions, caption_folder_samples, load_conversations
from library.vlm.encoding import IGNORE_INDEX, ConversationEncoder, collate, encode_all, model_inputs
from tests.vlm_helpers import conversation, draw, shapes_dataset

FAMILIES = ("llava_onevision", "qwen2_5_vl")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from library.vlm.tiny import save_tiny_vlm

    root = tmp_path_factory.mktemp("tiny_vlm")
    return {f: save_tiny_vlm(root / f, f) for f in FAMILIES}


def _load(folder: Path):
    from library.vlm.loading import load_vlm

    return load_vlm(folder)


def test_every_mismatch_is_named_with_file_line_and_sample(tmp_path):
    draw("circle", "red", tmp_path / "a.png")
    draw("square", "blue", tmp_path / "b.png")
    good = conversation("a.png", "What?", "a red circle")
    samples = [
        good,
        {"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                          {"from": "gpt", "value": "x"}]},
        {"image": "a.png", "conversations": [{"from": "gpt", "value": "<image>"}, {"from": "human", "value": "q"}]},
        {"image": "missing.png", "conversations": good["conversations"]},
        {"imagee": "a.png", "conversations": good["conversations"]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image> q"}]},
        {"video": "v.mp4", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"image": "a.png", "conversations": [{"from": "user", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(samples, indent=2), encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_conversations(path, DataOptions(tmp_path))
    text = err.value.message
    lines = text.splitlines()[1:]
    starts = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if line == "  {"]
    assert "1 <image> placeholder(s) in the user turns but 2 image(s)" in text
    assert f"data.json line {starts[1]} (sample 2)" in text
    assert "conversations[0] is a assistant turn where a user turn belongs" in text
    assert "missing.png does not exist" in text and f"line {starts[3]} (sample 4)" in text
    assert "unknown key 'imagee'; did you mean 'image'?" in text
    assert "must end with the assistant's answer" in text
    assert "video samples are not supported" in text
    assert "'from' is 'user'; expected 'human' or 'gpt'" in text
    assert not any("(sample 1)" in line for line in lines)
    assert text.startswith("data file") and "8 problems" in text


def test_jsonl_errors_name_the_line_and_relative_paths_need_the_folder(tmp_path):
    draw("circle", "red", tmp_path / "a.png")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(conversation("a.png", "q", "a")) + "\n\n{not json}\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"data.jsonl line 3: not valid JSON"):
        load_conversations(path, DataOptions(tmp_path))
    path.write_text(json.dumps(conversation("a.png", "q", "a")) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"line 1 \(sample 1\): image 'a.png' is a relative path: pass --image_folder"):
        load_conversations(path, DataOptions(None))
    samples = load_conversations(path, DataOptions(tmp_path))
    assert samples[0].images == [tmp_path / "a.png"] and samples[0].answer() == "a"


def test_fork_format_and_system_prompt(tmp_path):
    draw("circle", "red", tmp_path / "a.png")
    path = tmp_path / "fork.jsonl"
    path.write_text(json.dumps({"images": ["a.png"], "conversations": ["<image>\nIs it red?", "yes"],
                                "system_prompt": "Be brief."}) + "\n", encoding="utf-8")
    [sample] = load_conversations(path, DataOptions(tmp_path))
    assert [t.role for t in sample.turns] == ["user", "assistant"] and sample.system_prompt == "Be brief."


def test_caption_folder_becomes_describe_conversations(tmp_path, capsys):
    draw("circle", "red", tmp_path / "a.png")
    draw("square", "blue", tmp_path / "b.png")
    draw("square", "blue", tmp_path / "sub" / "c.png")
    (tmp_path / "a.txt").write_text("a red circle\n", encoding="utf-8")
    (tmp_path / "sub" / "c.caption").write_text("a blue square", encoding="utf-8")
    samples = caption_folder_samples(tmp_path, prompt="Describe it.")
    assert len(samples) == 1 and samples[0].turns[0].text == "<image>\nDescribe it."
    assert samples[0].answer() == "a red circle"
    assert "1 image(s)" in capsys.readouterr().out
    deep = caption_folder_samples(tmp_path, caption_extension="caption", recursive=True)
    assert [s.answer() for s in deep] == ["a blue square"]
    with pytest.raises(UserError, match="no image in .* has a .txt caption"):
        caption_folder_samples(tmp_path / "sub")


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_exactly_the_answers_and_their_end_of_turn(tiny, tmp_path, family):
    vlm = _load(tiny[family])
    draw("circle", "red", tmp_path / "a.png")
    draw("square", "blue", tmp_path / "b.png", size=48)
    path = tmp_path / "multi.json"
    path.write_text(json.dumps([{"image": ["a.png", "b.png"], "system_prompt": "Be brief.", "conversations": [
        {"from": "human", "value": "<image> and <image>: what?"}, {"from": "gpt", "value": "two shapes"},
        {"from": "human", "value": "colours?"}, {"from": "gpt", "value": "red and blue"}]},
        conversation("a.png", "What is it?", "a red circle")]), encoding="utf-8")
    samples = load_conversations(path, DataOptions(tmp_path))
    encoder = ConversationEncoder(vlm.family, vlm.tokenizer)
    tok = vlm.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for sample in samples:
        encoded = encoder.encode(sample)
        supervised = [i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
        expected = []
        for turn in sample.turns:
            if turn.role == "assistant":
                expected += tok.encode(turn.text, add_special_tokens=False) + [end]
        assert supervised == expected
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(encoded.input_ids, encoded.labels))
    # in a batch: padding and image positions are never supervised, and the model takes the inputs as they are
    items = [encoder.encode(s) for s in samples]
    batch = collate(vlm.family, items, tok.pad_token_id)
    image_id = vlm.family.image_token_id()
    assert (batch["labels"][batch["input_ids"] == image_id] == IGNORE_INDEX).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert int((batch["input_ids"] == image_id).sum()) == sum(e.image_tokens for e in items)
    with torch.no_grad():
        loss = vlm.model(**model_inputs(batch, torch.device("cpu"), torch.float32)).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_too_long_samples_are_an_error_or_dropped_with_a_count(tiny, tmp_path, family, capsys):
    vlm = _load(tiny[family])
    data = shapes_dataset(tmp_path)
    samples = load_conversations(data["train"], DataOptions(tmp_path))
    samples[2].turns[-1] = type(samples[2].turns[-1])("assistant", "a very long answer " * 20)
    encoder = ConversationEncoder(vlm.family, vlm.tokenizer)
    lengths = [len(encoder.encode(s)) for s in samples]
    limit = sorted(lengths)[-2]
    with pytest.raises(UserError) as err:
        encode_all(encoder, samples, max_length=limit, drop_too_long=False, name="training")
    assert "train.json line" in err.value.message and "(sample 3)" in err.value.message
    assert "--model_max_length" in err.value.message and "image tokens" in err.value.message
    kept = encode_all(encoder, samples, max_length=limit, drop_too_long=True, name="training")
    assert len(kept) == len(samples) - 1
    assert "dropped 1 of 8 training samples" in capsys.readouterr().out
    # a limit below the image tokens alone: every sample is too long, never a silent loss of 0
    with pytest.raises(UserError, match="every training sample is longer"):
        encode_all(encoder, samples, max_length=min(lengths) - 1, drop_too_long=True, name="training")


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_prompt_leaves_out_the_gold_answer(tiny, tmp_path, family):
    vlm = _load(tiny[family])
    draw("circle", "red", tmp_path / "a.png")
    path = tmp_path / "d.json"
    path.write_text(json.dumps([conversation("a.png", "Which colour?", "zebra-crimson-42")]), encoding="utf-8")
    [sample] = load_conversations(path, DataOptions(tmp_path))
    encoded = ConversationEncoder(vlm.family, vlm.tokenizer).encode(sample, for_generation=True)
    text = vlm.tokenizer.decode(encoded.input_ids)
    assert "zebra" not in text and "Which colour?" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert all(label == IGNORE_INDEX for label in encoded.labels)
