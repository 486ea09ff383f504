"""finetune/merge_captions_to_metadata.py, merge_dd_tags_to_metadata.py and clean_captions_and_tags.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from library.errors import UserError
from library.tools.clean_captions import clean_caption, clean_metadata, clean_tags
from library.tools.metadata_files import load_metadata, merge_cli, merge_text_files

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def folder(tmp_path, image_factory):
    d = tmp_path / "imgs"
    image_factory(d / "a.png", (32, 32))
    image_factory(d / "b.JPG", (32, 48), seed=1)
    image_factory(d / "c.webp", (48, 32), seed=2)
    image_factory(d / "sub" / "d.png", (32, 32), seed=3)
    (d / "a.caption").write_text("a photo of a cat\n", encoding="utf-8")
    (d / "b.caption").write_text("first line\nsecond line", encoding="utf-8")
    (d / "a.txt").write_text("1girl, solo", encoding="utf-8")
    (d / "c.txt").write_text("outdoors", encoding="utf-8")
    (d / "sub" / "d.caption").write_text("nested", encoding="utf-8")
    return d


def test_merge_captions_stem_keys_and_missing_files_are_skipped(folder, tmp_path):
    out = tmp_path / "meta.json"
    written, missing = merge_text_files(folder, out, field="caption", extension=".caption")
    assert written == 2
    assert missing == [folder / "c.webp"]
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data == {"a": {"caption": "a photo of a cat"}, "b": {"caption": "first line\nsecond line"}}


def test_merge_tags_into_existing_metadata_keeps_input_unchanged(folder, tmp_path):
    captions = tmp_path / "captions.json"
    merge_text_files(folder, captions, field="caption", extension=".caption")
    before = captions.read_bytes()
    out = tmp_path / "meta.json"
    merge_text_files(folder, out, field="tags", extension=".txt", in_json=captions)
    assert captions.read_bytes() == before, "--in_json is never modified"
    data = load_metadata(out)
    assert data["a"] == {"caption": "a photo of a cat", "tags": "1girl, solo"}
    assert data["c"] == {"tags": "outdoors"}


def test_out_json_is_updated_in_place_when_it_exists(folder, tmp_path):
    out = tmp_path / "meta.json"
    merge_text_files(folder, out, field="caption", extension=".caption")
    merge_text_files(folder, out, field="tags", extension="txt")
    assert load_metadata(out)["a"] == {"caption": "a photo of a cat", "tags": "1girl, solo"}


def test_full_path_and_recursive_keys(folder, tmp_path):
    out = tmp_path / "full.json"
    merge_text_files(folder, out, field="caption", extension=".caption", full_path=True, recursive=True)
    data = load_metadata(out)
    assert set(data) == {str(folder / "a.png"), str(folder / "b.JPG"), str(folder / "sub" / "d.png")}
    rel = tmp_path / "rel.json"
    merge_text_files(folder, rel, field="caption", extension=".caption", recursive=True)
    assert set(load_metadata(rel)) == {"a", "b", "sub/d"}


def test_full_path_keys_are_absolute_for_a_relative_folder(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(folder.parent)
    out = tmp_path / "full.json"
    merge_text_files(Path("imgs"), out, field="caption", extension=".caption", full_path=True)
    assert set(load_metadata(out)) == {str(folder / "a.png"), str(folder / "b.JPG")}


def test_existing_full_path_keys_are_reused(folder, tmp_path):
    start = tmp_path / "start.json"
    start.write_text(json.dumps({str(folder / "a.png"): {"tags": "x"}}), encoding="utf-8")
    out = tmp_path / "out.json"
    merge_text_files(folder, out, field="caption", extension=".caption", in_json=start)
    data = load_metadata(out)
    assert data[str(folder / "a.png")] == {"tags": "x", "caption": "a photo of a cat"}
    assert "a" not in data


def test_colliding_stems_keep_their_extension(tmp_path, image_factory):
    d = tmp_path / "d"
    image_factory(d / "x.png", (16, 16))
    image_factory(d / "x.jpg", (16, 16))
    (d / "x.caption").write_text("shared", encoding="utf-8")
    out = tmp_path / "m.json"
    merge_text_files(d, out, field="caption", extension=".caption")
    assert set(load_metadata(out)) == {"x.png", "x.jpg"}


def test_errors_name_the_file(tmp_path, folder):
    with pytest.raises(UserError, match="image folder not found"):
        merge_text_files(tmp_path / "nope", tmp_path / "o.json", field="caption", extension=".caption")
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": {"caption": "x"},\n  oops}', encoding="utf-8")
    with pytest.raises(UserError, match=r"broken\.json: invalid JSON at line 2"):
        merge_text_files(folder, tmp_path / "o.json", field="caption", extension=".caption", in_json=broken)
    (folder / "a.caption").write_bytes(b"\xff\xfe bad")
    with pytest.raises(UserError, match=r"a\.caption: not UTF-8"):
        merge_text_files(folder, tmp_path / "o.json", field="caption", extension=".caption")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        merge_text_files(empty, tmp_path / "o.json", field="caption", extension=".caption")


def test_merge_cli_reports_skipped(folder, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert merge_cli([str(folder), str(out)], field="tags", default_extension=".txt", description="") == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "b.JPG" in printed and "wrote 2 tags entries" in printed


@pytest.mark.parametrize(
    "script,field", [("merge_captions_to_metadata.py", "caption"), ("merge_dd_tags_to_metadata.py", "tags")]
)
def test_scripts_run_from_the_repo_root(folder, tmp_path, script, field):
    out = tmp_path / f"{field}.json"
    run = subprocess.run([sys.executable, f"finetune/{script}", str(folder), str(out)], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert all(field in entry for entry in load_metadata(out).values())


def test_script_error_has_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, "finetune/merge_captions_to_metadata.py", str(tmp_path / "x"),
                          str(tmp_path / "o.json")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and "image folder not found" in run.stderr


@pytest.mark.parametrize(
    "tags,expected",
    [
        ("long_hair, blue_eyes, ^_^, smile", "long hair, blue eyes, ^_^, smile"),
        ("1girl, solo, rating:safe, extra", "1girl, solo"),
        ("1girl, shirt, white_shirt, skirt", "1girl, white shirt, skirt"),
        ("2girls, long_hair, short_hair, blonde_hair, black_hair, blue_eyes, red_eyes, smile",
         "2girls, smile"),
        ("2girls, long_hair, blonde_hair, blue_eyes", "2girls, long hair, blonde hair, blue eyes"),
        ("1girl, long_hair, short_hair", "1girl, long hair, short hair"),
        ("multiple_boys, ponytail, braid, sleeveless, long_sleeves", "multiple boys"),
    ],
)
def test_clean_tags(tags, expected):
    assert clean_tags(tags) == expected


def test_deepdanbooru_rating_tail_is_cut():
    assert clean_tags("1girl, solo, rating:safe, rating:questionable") == "1girl, solo"
    assert clean_tags("rating:safe, 1girl") == "rating:safe, 1girl", "only a ', rating' tail is cut"


@pytest.mark.parametrize(
    "caption,expected",
    [
        ("a young woman standing", "a girl standing"),
        ("two anime women in a park", "two girls in a park"),
        ("a cartoon drawing of a person", "a drawing of a girl"),
        ("an anime cartoon image of a lady", "an image of a girl"),
        ("a girl girl girl", "a girl"),
        ("people on a bench", "girls on a bench"),
    ],
)
def test_clean_caption(caption, expected):
    assert clean_caption(caption) == expected


def test_clean_script_round_trip(tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"a": {"caption": "a young woman", "tags": "long_hair"}, "b": {}}), encoding="utf-8")
    before = src.read_bytes()
    out = tmp_path / "out.json"
    run = subprocess.run([sys.executable, "finetune/clean_captions_and_tags.py", str(src), str(out)], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "b: has neither tags nor caption" in run.stdout
    assert load_metadata(out) == {"a": {"caption": "a girl", "tags": "long hair"}, "b": {}}
    assert src.read_bytes() == before
    cleaned, notes = clean_metadata({"k": {"caption": "a woman"}})
    assert cleaned == {"k": {"caption": "a girl"}} and notes == []


def test_clean_refuses_non_text_values_naming_file_and_entries(tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"a": {"tags": ["x_y"], "caption": 5}, "b": {"tags": "ok"}}), encoding="utf-8")
    out = tmp_path / "out.json"
    run = subprocess.run([sys.executable, "finetune/clean_captions_and_tags.py", str(src), str(out)], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"{src}: cannot clean it: 2 problems" in run.stderr
    assert "'a': `tags` must be text, found list" in run.stderr and "'a': `caption` must be text" in run.stderr
    assert not out.exists()
