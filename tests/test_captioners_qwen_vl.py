"""Qwen2.5-VL captioner with a tiny random-weight model, tokenizer and image processor built in the test: a real
(small) byte-level BPE tokenizer and image processor, saved as a transformers folder and as one safetensors file
in the original / ComfyUI key layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.tools import qwen_vl_captioner as qc
from library.tools.qwen_vl_model import Fp8Linear, load_qwen_vl, to_transformers_key

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENS = "8"


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# Qwen/Qwen2.5-VL-7B-Instruct chat_template.json
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
MERGES = [("Ġ", "a"), ("t", "h"), ("th", "e"), ("Ġ", "the"), ("o", "n"), ("i", "n"), ("e", "r"), ("a", "t")]


def build_tokenizer():
    from library.vlm.tiny import build_tokenizer as build_qwen_tokenizer

    return build_qwen_tokenizer(SPECIAL_TOKENS, MERGES)


def build_model(ids: dict[str, int], vocab_size: int, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # a sharper output distribution makes greedy decoding robust to float noise
        model.lm_head.weight.mul_(20.0)
    return model


def original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 names -> original / ComfyUI names."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.visual."):
            key = key[len("model."):]
        elif key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        out[key] = value.contiguous()
    return out


def save_tiny_qwen_vl(root: Path) -> dict[str, Path]:
    """``folder``: transformers folder with processor files; ``file``: original-layout safetensors with
    config.json and the processor files beside it; ``bare``: the same file alone in a folder."""
    from safetensors.torch import save_file
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer, ids = build_tokenizer()
    model = build_model(ids, len(tokenizer))
    image_processor = Qwen2VLImageProcessorPil()
    folder = root / "transformers"
    model.save_pretrained(folder)
    single = root / "comfy"
    single.mkdir(parents=True)
    for target in (folder, single):
        tokenizer.save_pretrained(target)
        image_processor.save_pretrained(target)
        (target / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}), encoding="utf-8")
    model.config.to_json_file(single / "config.json")
    weights = original_layout(model.state_dict())
    save_file(weights, single / "qwen_2.5_vl_tiny.safetensors")
    bare = root / "bare"
    bare.mkdir()
    save_file(weights, bare / "qwen_2.5_vl_tiny.safetensors")
    return {"folder": folder, "file": single / "qwen_2.5_vl_tiny.safetensors", "processor": single,
            "bare": bare / "qwen_2.5_vl_tiny.safetensors"}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> dict[str, Path]:
    return save_tiny_qwen_vl(tmp_path_factory.mktemp("qwen_vl"))


@pytest.fixture
def images(tmp_path, image_factory) -> Path:
    folder = tmp_path / "images"
    image_factory(folder / "a.png", (90, 60), seed=1)
    image_factory(folder / "b.jpg", (50, 120), seed=2)
    image_factory(folder / "c.webp", (70, 70), seed=3)
    return folder


def caption(images: Path, model: Path, *extra: str) -> None:
    argv = ["--image_dir", str(images), "--model_path", str(model), "--max_new_tokens", TOKENS, "--max_size", "256"]
    if "--prompt" not in extra:
        argv += ["--prompt", "Describe the image."]  # the default prompt is long: the tests run faster without it
    argv += extra
    qc.run(qc.build_parser().parse_args(argv))


def read_jsonl(path: Path) -> dict[str, str]:
    return {Path(e["image_path"]).name: e["caption"]
            for e in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def test_jsonl_deterministic_and_batch_independent(images, qwen, tmp_path):
    outputs = []
    for run, batch in enumerate(["1", "1", "2", "3"]):
        out = tmp_path / f"captions{run}.jsonl"
        caption(images, qwen["folder"], "--output_file", str(out), "--batch_size", batch)
        outputs.append(read_jsonl(out))
    assert list(outputs[0]) == ["a.png", "b.jpg", "c.webp"]
    assert all(isinstance(c, str) and c for c in outputs[0].values())
    assert len(set(outputs[0].values())) > 1  # the image changes the caption
    assert outputs[0] == outputs[1] == outputs[2] == outputs[3]


def test_single_file_in_original_layout_matches_folder(images, qwen, tmp_path):
    caption(images, qwen["folder"], "--output_file", str(tmp_path / "folder.jsonl"))
    caption(images, qwen["file"], "--output_file", str(tmp_path / "file.jsonl"), "--batch_size", "2")
    assert read_jsonl(tmp_path / "folder.jsonl") == read_jsonl(tmp_path / "file.jsonl")


def test_processor_path_for_a_file_alone_in_its_folder(images, qwen, tmp_path):
    """A weights file alone in its folder (as ComfyUI users have it) with --processor_path to the tokenizer,
    image processor and config: the same captions as the transformers folder."""
    caption(images, qwen["folder"], "--output_file", str(tmp_path / "folder.jsonl"))
    caption(images, qwen["bare"], "--output_file", str(tmp_path / "bare.jsonl"), "--processor_path",
            str(qwen["processor"]))
    assert read_jsonl(tmp_path / "bare.jsonl") == read_jsonl(tmp_path / "folder.jsonl")


def test_original_key_names_are_renamed():
    assert to_transformers_key("model.layers.0.mlp.up_proj.weight") == \
        "model.language_model.layers.0.mlp.up_proj.weight"
    assert to_transformers_key("visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    assert to_transformers_key("lm_head.weight") == "lm_head.weight"
    assert to_transformers_key("model.visual.merger.mlp.0.bias") == "model.visual.merger.mlp.0.bias"


def test_text_output_skip_and_overwrite(images, qwen, tmp_path, capsys):
    (images / "b.txt").write_text("my own caption", encoding="utf-8")
    caption(images, qwen["folder"], "--output_format", "text", "--output_file", str(tmp_path / "unused.jsonl"))
    assert "unused.jsonl is not used" in capsys.readouterr().out
    assert not (tmp_path / "unused.jsonl").exists()
    assert (images / "b.txt").read_text(encoding="utf-8") == "my own caption"
    caption(images, qwen["folder"], "--output_file", str(tmp_path / "ref.jsonl"))
    expected = read_jsonl(tmp_path / "ref.jsonl")
    assert (images / "a.txt").read_text(encoding="utf-8") == expected["a.png"]
    caption(images, qwen["folder"], "--output_format", "text", "--overwrite")
    assert (images / "b.txt").read_text(encoding="utf-8") == expected["b.jpg"]


def test_interrupted_jsonl_resumes(images, qwen, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    caption(images, qwen["folder"], "--output_file", str(out))
    expected = read_jsonl(out)
    lines = out.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    first["caption"] = "kept from the first run"
    out.write_text(json.dumps(first) + "\n" + lines[1][: len(lines[1]) // 2], encoding="utf-8")  # killed mid-line
    caption(images, qwen["folder"], "--output_file", str(out), "--batch_size", "2")
    assert "incomplete last line" in capsys.readouterr().out
    resumed = read_jsonl(out)
    assert resumed == {**expected, "a.png": "kept from the first run"}
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3
    caption(images, qwen["folder"], "--output_file", str(out), "--overwrite")
    assert read_jsonl(out) == expected
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3


def test_recursive_and_unreadable_images(images, qwen, tmp_path, capsys, image_factory):
    image_factory(images / "sub" / "d.png", (40, 40), seed=4)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "captions.jsonl"
    caption(images, qwen["folder"], "--output_file", str(out), "--recursive", "--batch_size", "2")
    printed = capsys.readouterr().out
    assert "broken.png" in printed and "cannot read" in printed
    assert sorted(read_jsonl(out)) == ["a.png", "b.jpg", "c.webp", "d.png"]


def test_fp8_weights(images, qwen, tmp_path):
    vl = load_qwen_vl(str(qwen["file"]), None, torch.device("cpu"), fp8=True)
    linears = [m for m in vl.model.modules() if isinstance(m, Fp8Linear)]
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert vl.model.model.language_model.embed_tokens.weight.dtype == torch.float32
    out = tmp_path / "fp8.jsonl"
    caption(images, qwen["file"], "--output_file", str(out), "--fp8_vl")
    assert len(read_jsonl(out)) == 3


def test_inputs_are_assembled_like_the_processor(qwen):
    vl = load_qwen_vl(str(qwen["folder"]), None, torch.device("cpu"), fp8=False)
    assert vl.processor is None  # no torchvision here: the manual path is the one under test
    pics = [qc.resize_to_bucket(Image.new("RGB", (300, 200), (9, 9, 9)), 256),
            qc.resize_to_bucket(Image.new("RGB", (200, 400), (9, 9, 9)), 256)]
    inputs = qc.build_inputs(vl, pics, "line one\nline two", 256)
    image_id = vl.model.config.image_token_id
    grids = inputs["image_grid_thw"]
    counts = (inputs["input_ids"] == image_id).sum(dim=1).tolist()
    assert counts == [int(g.prod()) // 4 for g in grids]
    assert counts[0] != counts[1]
    assert inputs["pixel_values"].shape[0] == int(grids.prod(dim=1).sum())
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == image_id).long())
    shorter = counts.index(min(counts))
    assert inputs["attention_mask"][shorter, 0] == 0 and inputs["attention_mask"][:, -1].all()  # left padding
    text = vl.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|>")
    assert text.endswith("<|vision_end|>line one\nline two<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("size, max_size, expected", [
    ((2000, 1500), 1280, (1456, 1092)), ((1024, 1024), 1280, (1036, 1036)), ((512, 768), 1280, (504, 756)),
    ((200, 300), 1280, (224, 336)), ((3840, 2160), 1280, (1680, 952)),
])
def test_bucket_sizes_match_the_reference(size, max_size, expected):
    assert qc.bucket_size(*size, max_size) == expected
    assert qc.resize_to_bucket(Image.new("RGB", size), max_size).size == expected


def test_prompt_newlines_from_the_command_line(monkeypatch, images, qwen, tmp_path):
    seen = []
    real = qc.build_inputs

    def spy(vl, pics, prompt, max_size):
        seen.append(prompt)
        return real(vl, pics, prompt, max_size)

    monkeypatch.setattr(qc, "build_inputs", spy)
    caption(images, qwen["folder"], "--output_file", str(tmp_path / "p.jsonl"), "--prompt", "Describe:\\nbriefly")
    assert seen and set(seen) == {"Describe:\nbriefly"}


def test_user_errors(images, qwen, tmp_path):
    with pytest.raises(UserError, match="needs --output_file"):
        caption(images, qwen["folder"])
    with pytest.raises(UserError, match="no Qwen2.5-VL tokenizer"):
        caption(images, qwen["bare"], "--output_file", str(tmp_path / "x.jsonl"))
    with pytest.raises(UserError, match="do not match the Qwen2.5-VL-7B config"):
        load_qwen_vl(str(qwen["bare"]), str(_processor_only(qwen, tmp_path)), torch.device("cpu"), False)
    with pytest.raises(UserError, match="does not exist"):
        caption(images, tmp_path / "missing.safetensors", "--output_file", str(tmp_path / "x.jsonl"))
    with pytest.raises(UserError, match="no images"):
        caption(tmp_path, qwen["folder"], "--output_file", str(tmp_path / "x.jsonl"))
    with pytest.raises(UserError, match="did you mean --max_new_tokens"):
        caption(images, qwen["folder"], "--max_new_tokns", "3")
    with pytest.raises(UserError, match="--output_file .* is a folder"):
        caption(images, qwen["folder"], "--output_file", str(tmp_path))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for f in qwen["folder"].iterdir():
        if not f.name.endswith(".safetensors"):
            (no_weights / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UserError, match="cannot load the Qwen2.5-VL model folder.*model.safetensors"):
        caption(images, no_weights, "--output_file", str(tmp_path / "y.jsonl"))
    (no_weights / "tokenizer.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match="cannot load the Qwen2.5-VL tokenizer"):
        caption(images, no_weights, "--output_file", str(tmp_path / "y.jsonl"))
    assert not (tmp_path / "x.jsonl").exists() or (tmp_path / "x.jsonl").read_text() == ""


def _processor_only(qwen: dict[str, Path], tmp_path: Path) -> Path:
    """The processor files without a config.json (so the 7B default config applies)."""
    folder = tmp_path / "processor_only"
    folder.mkdir()
    for f in qwen["processor"].iterdir():
        if f.name != "config.json" and not f.name.endswith(".safetensors"):
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_script_reports_user_errors(images):
    result = subprocess.run([sys.executable, "caption_images_by_qwen_vl.py", "--image_dir", str(images),
                             "--model_path", "nowhere"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "error: --output_format jsonl needs --output_file" in result.stderr
