"""WD14 tagger: a tiny ONNX tagger exported in the test, whose outputs are set through its final layer."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.tools import wd14_tagger
from library.tools.wd14_tagger import preprocess

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZE = 32
RATINGS = [("general", 0.7), ("sensitive", 0.2), ("questionable", 0.05), ("explicit", 0.01)]
GENERAL = [("1girl", 0.9), ("solo", 0.8), ("long_hair", 0.5), ("smile", 0.3), ("^_^", 0.6), ("blue_sky", None)]
CHARACTER = [("hatsune_miku_(vocaloid)", 0.6), ("rem_(re:zero)", 0.4)]
BLUE_SKY = len(RATINGS) + 5


class TinyTagger(torch.nn.Module):
    """NHWC 0..255 input (as WD14); outputs probabilities. Every tag has a fixed probability except
    ``blue_sky``, which follows the mean of input channel 0 (blue, since the tagger feeds BGR)."""

    def __init__(self, logits: list[float], blue_index: int | None, probabilities: bool = True):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.fc = torch.nn.Linear(3, len(logits))
        self.probabilities = probabilities
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.conv.bias.zero_()
            self.fc.weight.zero_()
            self.fc.bias.copy_(torch.tensor(logits))
            if blue_index is not None:
                self.fc.weight[blue_index, 0] = 8.0
                self.fc.bias[blue_index] = -4.0

    def forward(self, x):
        x = self.conv(x.permute(0, 3, 1, 2)).mean(dim=(2, 3)) / 255.0
        y = self.fc(x)
        return torch.sigmoid(y) if self.probabilities else y


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _export(model: torch.nn.Module, path: Path, shape: tuple[int, ...], batch: int | None = None) -> None:
    dynamic = None if batch else {"input_1": {0: "batch"}}
    torch.onnx.export(model.eval(), (torch.zeros(batch or 1, *shape),), str(path), input_names=["input_1"],
                      output_names=["output"], dynamic_axes=dynamic, dynamo=False)


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wd14") / "SmilingWolf_wd-v1-4-convnext-tagger-v2"
    folder.mkdir()
    rows = [(n, "9", p) for n, p in RATINGS] + [(n, "0", p) for n, p in GENERAL] + [(n, "4", p) for n, p in CHARACTER]
    lines = ["tag_id,name,category,count"] + [f"{i},{n},{c},{100 - i}" for i, (n, c, _) in enumerate(rows)]
    (folder / "selected_tags.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    logits = [_logit(p) if p is not None else 0.0 for _, _, p in rows]
    _export(TinyTagger(logits, BLUE_SKY), folder / "model.onnx", (SIZE, SIZE, 3))
    return folder


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 40), (0, 0, 255)).save(folder / "a_blue.png")
    Image.new("RGB", (40, 40), (255, 0, 0)).save(folder / "b_red.jpg")
    return folder


def tag(folder: Path, model: Path, *extra: str) -> None:
    wd14_tagger.run(wd14_tagger.build_parser().parse_args([str(folder), "--model_dir", str(model), *extra]))


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


DEFAULT_RED = "1girl, solo, long_hair, ^_^, hatsune_miku_(vocaloid), rem_(re:zero)\n"
DEFAULT_BLUE = "1girl, solo, long_hair, ^_^, blue_sky, hatsune_miku_(vocaloid), rem_(re:zero)\n"


def test_default_tags_follow_csv_order_and_bgr_input(images, tagger_dir):
    tag(images, tagger_dir)
    assert read(images / "b_red.txt") == DEFAULT_RED
    assert read(images / "a_blue.txt") == DEFAULT_BLUE


def test_batch_sizes_and_model_folder_forms_agree(images, tagger_dir, tmp_path):
    tag(images, tagger_dir.parent, "--batch_size", "2", "--caption_extension", ".b2")
    tag(images, tagger_dir, "--batch_size", "1", "--caption_extension", ".b1")
    for stem in ("a_blue", "b_red"):
        assert read(images / f"{stem}.b1") == read(images / f"{stem}.b2")
    assert read(images / "a_blue.b2") == DEFAULT_BLUE


@pytest.mark.parametrize("options, expected", [
    (["--general_threshold", "0.55", "--character_threshold", "0.5"], "1girl, solo, ^_^, hatsune_miku_(vocaloid)"),
    (["--thresh", "0.85"], "1girl"),
    (["--character_threshold", "1.5"], "1girl, solo, long_hair, ^_^"),
    (["--remove_underscore"], "1girl, solo, long hair, ^_^, hatsune miku (vocaloid), rem (re:zero)"),
    (["--character_tags_first"], "hatsune_miku_(vocaloid), rem_(re:zero), 1girl, solo, long_hair, ^_^"),
    (["--use_rating_tags"], "general, 1girl, solo, long_hair, ^_^, hatsune_miku_(vocaloid), rem_(re:zero)"),
    (["--use_rating_tags_as_last_tag", "--character_threshold", "1.1"], "1girl, solo, long_hair, ^_^, general"),
    (["--undesired_tags", "solo, long_hair,rem_(re:zero)"], "1girl, ^_^, hatsune_miku_(vocaloid)"),
    (["--remove_underscore", "--undesired_tags", "long hair"], "1girl, solo, ^_^, hatsune miku (vocaloid), "
                                                                "rem (re:zero)"),
    (["--tag_replacement", "1girl,1woman;solo,alone;^_^,smile\\,happy", "--character_threshold", "2"],
     "1woman, alone, long_hair, smile,happy"),
    (["--always_first_tags", "solo,1girl,absent", "--use_rating_tags", "--character_threshold", "2"],
     "solo, 1girl, general, long_hair, ^_^"),
    (["--character_tag_expand", "--general_threshold", "2"], "hatsune_miku, vocaloid, rem, re:zero"),
    (["--caption_separator", " | ", "--undesired_tags", "solo|^_^", "--character_threshold", "2"],
     "1girl | long_hair"),
])
def test_tag_options(images, tagger_dir, options, expected):
    tag(images, tagger_dir, *options)
    assert read(images / "b_red.txt") == expected + "\n"


def test_existing_files_skipped_overwritten_or_appended(images, tagger_dir):
    (images / "b_red.txt").write_text("mine, 1girl\n", encoding="utf-8")
    tag(images, tagger_dir)
    assert read(images / "b_red.txt") == "mine, 1girl\n"
    assert read(images / "a_blue.txt") == DEFAULT_BLUE
    tag(images, tagger_dir, "--append_tags", "--character_threshold", "2")
    assert read(images / "b_red.txt") == "mine, 1girl, solo, long_hair, ^_^\n"
    tag(images, tagger_dir, "--overwrite")
    assert read(images / "b_red.txt") == DEFAULT_RED


def test_unreadable_image_reported_and_skipped(images, tagger_dir, capsys):
    (images / "c_broken.png").write_bytes(b"not a png at all")
    tag(images, tagger_dir)
    captured = capsys.readouterr()
    assert "c_broken.png" in captured.out and "cannot read" in captured.out
    assert not (images / "c_broken.txt").exists()
    assert read(images / "b_red.txt") == DEFAULT_RED
    assert "3/3" in captured.err  # the progress bar counts the skipped image and ends full


def test_output_path_folder_or_binary_file_is_a_clear_error(images, tagger_dir, tmp_path):
    folder = tmp_path / "out.jsonl"
    folder.mkdir()
    with pytest.raises(UserError, match="is a folder; give a file name"):
        tag(images, tagger_dir, "--output_path", str(folder))
    binary = tmp_path / "meta.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="not a UTF-8 text file"):
        tag(images, tagger_dir, "--output_path", str(binary))
    (images / "a_blue.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="a_blue.txt: not a UTF-8 text file"):
        tag(images, tagger_dir)


def test_json_and_jsonl_outputs(images, tagger_dir, tmp_path):
    sub = images / "sub"
    sub.mkdir()
    Image.new("RGB", (30, 20), (0, 0, 255)).save(sub / "wide.webp")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({str(images / "b_red.jpg"): {"caption": "a red square"}}), encoding="utf-8")
    tag(images, tagger_dir, "--output_path", str(meta), "--recursive", "--character_threshold", "2")
    data = json.loads(read(meta))
    assert data[str(images / "b_red.jpg")] == {"caption": "a red square", "tags": "1girl, solo, long_hair, ^_^",
                                               "image_size": [40, 40]}
    assert data[str(sub / "wide.webp")]["image_size"] == [30, 20]
    assert "blue_sky" in data[str(sub / "wide.webp")]["tags"]
    assert not list(images.glob("*.txt"))

    lines_path = tmp_path / "tags.jsonl"
    tag(images, tagger_dir, "--output_path", str(lines_path), "--character_threshold", "2")
    lines = [json.loads(line) for line in read(lines_path).splitlines()]
    assert [Path(e["image_path"]).name for e in lines] == ["a_blue.png", "b_red.jpg"]
    assert lines[1] == {"image_path": str(images / "b_red.jpg"), "caption": "1girl, solo, long_hair, ^_^",
                        "image_size": [40, 40]}
    tag(images, tagger_dir, "--output_path", str(lines_path), "--recursive")
    lines = [json.loads(line) for line in read(lines_path).splitlines()]
    assert len(lines) == 3 and lines[1]["caption"] == "1girl, solo, long_hair, ^_^"


def test_frequency_and_debug_output(images, tagger_dir, capsys):
    tag(images, tagger_dir, "--frequency_tags", "--debug", "--character_threshold", "2")
    out = capsys.readouterr().out
    assert "1girl: 2" in out and "blue_sky: 1" in out
    assert "rating [general]" in out


def test_preprocess_pads_white_resizes_and_swaps_to_bgr():
    image = Image.new("RGB", (20, 10), (10, 20, 30))
    array = preprocess(image, 16, nchw=False)
    assert array.shape == (16, 16, 3) and array.dtype == np.float32
    assert array[0, 8].tolist() == [255.0, 255.0, 255.0]  # padding band at the top
    assert array[8, 8].tolist() == [30.0, 20.0, 10.0]  # BGR
    nchw = preprocess(image, 16, nchw=True)
    assert nchw.shape == (3, 16, 16) and nchw[0, 8, 8] == pytest.approx(30 / 127.5 - 1)


def test_tag_mapping_layout_sorts_by_probability(images, tmp_path):
    folder = tmp_path / "mapping"
    folder.mkdir()
    tags = [("general", "Rating", 0.8), ("explicit", "Rating", 0.1), ("best_quality", "Quality", 0.7),
            ("solo", "General", 0.6), ("1girl", "General", 0.9), ("miku", "Character", 0.5),
            ("vocaloid", "Copyright", 0.95), ("artist_x", "Artist", 0.2)]
    mapping = {str(i): {"tag": t, "category": c} for i, (t, c, _) in enumerate(tags)}
    (folder / "tag_mapping.json").write_text(json.dumps(mapping), encoding="utf-8")

    class NchwLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = TinyTagger([_logit(p) for _, _, p in tags], None, probabilities=False)

        def forward(self, x):
            return self.inner(x.permute(0, 2, 3, 1))

    _export(NchwLogits(), folder / "model_optimized.onnx", (3, SIZE, SIZE))
    tag(images, folder, "--use_rating_tags", "--use_quality_tags_as_last_tag", "--character_tags_first")
    assert read(images / "b_red.txt") == "general, miku, vocaloid, 1girl, solo, best_quality\n"


def test_fixed_batch_model_overrides_batch_size(images, tmp_path, tagger_dir, capsys):
    folder = tmp_path / "fixed"
    folder.mkdir()
    (folder / "selected_tags.csv").write_text(read(tagger_dir / "selected_tags.csv"), encoding="utf-8")
    rows = RATINGS + GENERAL + CHARACTER
    _export(TinyTagger([_logit(p) if p else 0.0 for _, p in rows], BLUE_SKY), folder / "model.onnx",
            (SIZE, SIZE, 3), batch=4)
    tag(images, folder, "--batch_size", "3")
    assert "exactly 4" in capsys.readouterr().out
    assert read(images / "a_blue.txt") == DEFAULT_BLUE and read(images / "b_red.txt") == DEFAULT_RED


def test_missing_model_offline_is_a_clear_error(images, tmp_path, tagger_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="model.onnx, selected_tags.csv.*HF_HUB_OFFLINE"):
        tag(images, tmp_path / "nothing_here")
    with pytest.raises(UserError, match="model_optimized.onnx, tag_mapping.json.*HF_HUB_OFFLINE"):
        tag(images, tmp_path / "nothing_here", "--repo_id", "someone/cl_tagger/v1")
    with pytest.raises(UserError, match="--force_download needs the Hugging Face Hub.*HF_HUB_OFFLINE"):
        tag(images, tagger_dir.parent, "--force_download")
    assert not list(images.glob("*.txt"))


@pytest.mark.parametrize("options, message", [
    (["--use_rating_tags", "--use_rating_tags_as_last_tag"], "exclude each other"),
    (["--tag_replacement", "a,b,c"], "source,replacement"),
    (["--output_path", "x.csv"], "must end in .json or .jsonl"),
    (["--batch_size", "0"], "at least 1"),
    (["--general_threshhold", "0.3"], "did you mean --general_threshold"),
])
def test_user_errors(images, tagger_dir, options, message):
    with pytest.raises(UserError, match=message):
        tag(images, tagger_dir, *options)


def test_script_runs_from_repo_root(images, tagger_dir):
    cmd = [sys.executable, "finetune/tag_images_by_wd14_tagger.py", str(images), "--model_dir", str(tagger_dir)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert read(images / "b_red.txt") == DEFAULT_RED
    bad = subprocess.run(cmd + ["--batch_size", "0"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "error: --batch_size must be at least 1" in bad.stderr


def test_caption_path_that_is_a_folder_is_skipped_and_named(images, tagger_dir, capsys):
    (images / "a_blue.txt").mkdir()  # issue 13 case 6: one target cannot be written
    tag(images, tagger_dir)
    out = capsys.readouterr().out
    assert f"skipping {images / 'a_blue.png'}: {images / 'a_blue.txt'} is a folder" in out
    assert "1 skipped (their output path is not writable" in out
    assert (images / "a_blue.txt").is_dir() and not any((images / "a_blue.txt").iterdir())
    assert read(images / "b_red.txt") == DEFAULT_RED  # the rest are tagged
