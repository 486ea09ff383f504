"""--dataset_config validation/resolution and the old-style --train_data_dir layout."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from library.config.arguments import (
    SUPPORT_FINE_TUNE,
    SUPPORT_TRAIN_DB,
    SUPPORT_TRAIN_NETWORK,
    add_config_file_arguments,
    add_dataset_arguments,
)
from library.config.dataset_config import main as check_main
from library.config.dataset_config import resolve_dataset_params
from library.config.params import DatasetSupport, DreamBoothSubsetParams, FineTuningSubsetParams
from library.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def parse(argv: list[str], support: DatasetSupport = SUPPORT_TRAIN_NETWORK) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser, support)
    add_config_file_arguments(parser)
    return parser.parse_args(argv)


def resolve(config: Path, *cli: str, support: DatasetSupport = SUPPORT_TRAIN_NETWORK):
    return resolve_dataset_params(parse(["--dataset_config", str(config), *cli], support), support)


def error_of(config: Path, *cli: str, support: DatasetSupport = SUPPORT_TRAIN_NETWORK) -> str:
    with pytest.raises(UserError) as exc:
        resolve(config, *cli, support=support)
    return exc.value.message


@pytest.fixture
def dirs(tmp_path):
    """Folders named as in the seeds' examples (hoge, fuga, reg, piyo + piyo_md.json)."""
    out = {}
    for name in ("hoge", "fuga", "reg", "piyo"):
        out[name] = tmp_path / name
        out[name].mkdir()
    out["md"] = out["piyo"] / "piyo_md.json"
    out["md"].write_text("{}")
    return out


def write(path: Path, text: str, **paths) -> Path:
    path.write_text(text.format(**{k: str(v).replace("\\", "/") for k, v in paths.items()}), encoding="utf-8")
    return path


SEED_EXAMPLE = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{hoge}'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = '{fuga}'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{reg}'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{piyo}'
  metadata_file = '{md}'
  # This subset uses keep_tokens = 1 (the value of [general])
"""


def test_seed_example_resolves(tmp_path, dirs):
    group = resolve(write(tmp_path / "cfg.toml", SEED_EXAMPLE, **dirs))
    db, ft = group.datasets
    assert (db.kind, ft.kind) == ("dreambooth", "finetuning")
    assert (db.resolution, db.batch_size, ft.resolution, ft.batch_size) == ((512, 512), 4, (768, 768), 2)
    assert [s.keep_tokens for s in db.subsets] == [2, 3, 1]
    assert ft.subsets[0].keep_tokens == 1
    assert all(s.shuffle_caption for s in db.subsets + ft.subsets)
    assert all(isinstance(s, DreamBoothSubsetParams) and s.caption_extension == ".txt" for s in db.subsets)
    assert [s.class_tokens for s in db.subsets] == ["hoge girl", "fuga boy", "human"]
    assert [s.is_reg for s in db.subsets] == [False, False, True]
    assert isinstance(ft.subsets[0], FineTuningSubsetParams)
    assert ft.subsets[0].metadata_file == str(dirs["md"]).replace("\\", "/")
    assert [s.origin for s in db.subsets] == [f"datasets[0].subsets[{i}]" for i in range(3)]
    assert group.source.endswith("cfg.toml") and group.skipped == []


def test_seed_separator_example(tmp_path, dirs):
    cfg = write(tmp_path / "sep.toml", """
[general]
flip_aug = true
color_aug = false
resolution = [1024, 1024]

[[datasets]]
batch_size = 6
enable_bucket = true
bucket_no_upscale = true
caption_extension = ".txt"
keep_tokens_separator= "|||"
shuffle_caption = true
caption_tag_dropout_rate = 0.1
secondary_separator = ";;;" # subset 側に書くこともできます / can be written in the subset side
enable_wildcard = true # 同上 / same as above

  [[datasets.subsets]]
  image_dir = "{hoge}"
  num_repeats = 1
  caption_prefix = "1girl, hatsune miku, vocaloid |||"
  caption_suffix = ", anime screencap ||| masterpiece, rating: general"
""", **dirs)
    (ds,) = resolve(cfg).datasets
    (s,) = ds.subsets
    assert (ds.resolution, ds.batch_size, ds.enable_bucket, ds.bucket_no_upscale) == ((1024, 1024), 6, True, True)
    assert (s.flip_aug, s.color_aug, s.shuffle_caption, s.enable_wildcard) == (True, False, True, True)
    assert (s.keep_tokens_separator, s.secondary_separator, s.caption_tag_dropout_rate) == ("|||", ";;;", 0.1)
    assert s.caption_prefix == "1girl, hatsune miku, vocaloid |||"
    assert s.caption_suffix == ", anime screencap ||| masterpiece, rating: general"


def test_seed_dreambooth_and_finetune_examples(tmp_path, dirs):
    db = write(tmp_path / "db.toml", """
[general]
enable_bucket = true                        # Aspect Ratio Bucketingを使うか否か

[[datasets]]
resolution = 512                            # 学習解像度
batch_size = 4                              # バッチサイズ

  [[datasets.subsets]]
  image_dir = '{hoge}'                     # 学習用画像を入れたフォルダを指定
  class_tokens = 'hoge girl'                # identifier class を指定
  num_repeats = 10                          # 学習用画像の繰り返し回数

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{reg}'                      # 正則化画像を入れたフォルダを指定
  class_tokens = 'girl'                     # class を指定
  num_repeats = 1                           # 正則化画像の繰り返し回数、基本的には1でよい
""", **dirs)
    (ds,) = resolve(db, support=SUPPORT_TRAIN_DB).datasets
    assert ds.enable_bucket and ds.resolution == (512, 512) and ds.batch_size == 4
    got = [(s.num_repeats, s.is_reg, s.class_tokens) for s in ds.subsets]
    assert got == [(10, False, "hoge girl"), (1, True, "girl")]
    assert ds.subsets[0].caption_extension == ".caption"

    ft = write(tmp_path / "ft.toml", """
[general]
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 512                                    # 学習解像度
batch_size = 4                                      # バッチサイズ

  [[datasets.subsets]]
  image_dir = '{piyo}'                             # 学習用画像を入れたフォルダを指定
  metadata_file = '{md}'            # メタデータファイル名
""", **dirs)
    (ds,) = resolve(ft, support=SUPPORT_FINE_TUNE).datasets
    assert ds.kind == "finetuning" and ds.subsets[0].keep_tokens == 1 and ds.subsets[0].shuffle_caption


def test_json_config(tmp_path, dirs):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"general": {"flip_aug": True},
                               "datasets": [{"resolution": [512, 768], "subsets": [{"image_dir": str(dirs["hoge"]),
                                                                                    "num_repeats": 3}]}]}))
    (ds,) = resolve(cfg).datasets
    assert ds.resolution == (512, 768) and ds.subsets[0].num_repeats == 3 and ds.subsets[0].flip_aug
    bad = tmp_path / "bad.json"
    bad.write_text('{"datasets": [\n  {"resolution": 512,}\n]}')
    with pytest.raises(UserError, match=r"bad.json: not valid JSON: .*line 2, column"):
        resolve(bad)


PRECEDENCE = """
[general]
{g}
[[datasets]]
{d}
  [[datasets.subsets]]
  image_dir = '{hoge}'
  {s}
"""


@pytest.mark.parametrize("levels, cli, expected", [
    ("gds", True, 2), ("gd", True, 3), ("g", True, 4), ("", True, 5), ("", False, 0), ("gs", False, 2),
])
def test_precedence_subset_dataset_general_cli_default(tmp_path, dirs, levels, cli, expected):
    text = PRECEDENCE.format(g="keep_tokens = 4" if "g" in levels else "", d="keep_tokens = 3" if "d" in levels else "",
                             s="keep_tokens = 2" if "s" in levels else "", hoge="{hoge}")
    cfg = write(tmp_path / "p.toml", text, **dirs)
    group = resolve(cfg, *(["--keep_tokens", "5"] if cli else []))
    assert group.datasets[0].subsets[0].keep_tokens == expected


@pytest.mark.parametrize("general, dataset, cli, expected", [
    ("resolution = 576", "resolution = [512, 640]", ["--resolution", "640"], (512, 640)),
    ("resolution = 576", "", ["--resolution", "640"], (576, 576)),
    ("", "", ["--resolution", "640,448"], (640, 448)),
    ("", "", [], (512, 512)),
])
def test_precedence_dataset_options(tmp_path, dirs, general, dataset, cli, expected):
    cfg = write(tmp_path / "p.toml", PRECEDENCE.format(g=general, d=dataset, s="", hoge="{hoge}"), **dirs)
    assert resolve(cfg, *cli).datasets[0].resolution == expected


def test_command_line_names_map_to_config_options(tmp_path, dirs):
    cfg = write(tmp_path / "p.toml", PRECEDENCE.format(g="", d="", s="", hoge="{hoge}"), **dirs)
    group = resolve(cfg, "--train_batch_size", "3", "--dataset_repeats", "7", "--flip_aug", "--caption_extension",
                    ".txt", "--face_crop_aug_range", "2.0,4.0", "--prior_loss_weight", "0.5", "--validation_split",
                    "0.25")
    ds = group.datasets[0]
    s = ds.subsets[0]
    assert (ds.batch_size, s.num_repeats, s.flip_aug, s.caption_extension) == (3, 7, True, ".txt")
    assert s.face_crop_aug_range == (2.0, 4.0)
    assert (ds.prior_loss_weight, ds.validation_split) == (0.5, 0.25)
    old_spelling = resolve(cfg, "--caption_extention", ".tags").datasets[0].subsets[0]
    assert old_spelling.caption_extension == ".tags"


def test_all_problems_listed_with_file_place_key_and_hints(tmp_path, dirs):
    cfg = write(tmp_path / "bad.toml", """
[general]
caption_extention = '.txt'
class_tokens = 'girl'

[[datasets]]
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{hoge}'
  num_repeats = 'ten'
  caption_extenson = '.txt'

[[datasets]]
resolution = 'big'
  [[datasets.subsets]]
  image_dir = '{fuga}'
  batch_size = 4
  shuffle_caption = 1
  flip_aug = "true"
  num_repeats = "3"
  [[datasets.subsets]]
  class_tokens = 'no dir'
""", **dirs)
    msg = error_of(cfg)
    lines = msg.splitlines()
    assert lines[0].startswith("invalid dataset config: 10 problems")
    assert all(str(cfg) in line for line in lines[1:])
    expected = [
        "[general]: `caption_extention` is not a dataset config key: did you mean 'caption_extension'?",
        "[general]: `class_tokens` may only be set in [[datasets.subsets]], not in [general]",
        "datasets[0].subsets[0]: `num_repeats`: expected an integer, found 'ten' (string)",
        "datasets[0].subsets[0]: unknown key `caption_extenson` in [[datasets.subsets]]. did you mean "
        "'caption_extension'?",
        "datasets[1]: `resolution`: expected a size like 512 or [width, height] like [512, 768], found 'big' (string)",
        "datasets[1].subsets[0]: `batch_size` may only be set in [general] or [[datasets]], "
        "not in [[datasets.subsets]]",
        "datasets[1].subsets[0]: `shuffle_caption`: expected true or false, found 1 (integer)",
        "datasets[1].subsets[1]: `image_dir` is required",
        "datasets[1].subsets[0]: `flip_aug`: expected true or false, found 'true' (string) (write it without quotes: "
        "true)",
        "datasets[1].subsets[0]: `num_repeats`: expected an integer, found '3' (string) (write it without quotes: 3)",
    ]
    for text in expected:
        assert text in msg, text


def test_value_problems(tmp_path, dirs):
    cfg = write(tmp_path / "v.toml", """
[general]
enable_bucket = true
min_bucket_reso = 300
caption_dropout_rate = 1.5

[[datasets]]
resolution = -512
  [[datasets.subsets]]
  image_dir = '{hoge}/missing'
  resize_interpolation = 'bicubik'
  face_crop_aug_range = [3.0, 2.0]
  caption_extension = 'txt'

[[datasets]]
max_bucket_reso = 128
validation_split = 1.0
  [[datasets.subsets]]
  metadata_file = '{piyo}/nothere.json'
[[datasets]]
  [[datasets.subsets]]
  image_dir = ''
  [[datasets.subsets]]
  image_dir = '{md}'
""", **dirs)
    msg = error_of(cfg)
    expected = [
        "datasets[0]: `resolution` = [-512, -512] (set in datasets[0]) must be positive",
        "datasets[0]: `min_bucket_reso` = 300 (set in [general]) must be a positive multiple of bucket_reso_steps = 64;"
        " use e.g. 256 or 320",
        "datasets[0].subsets[0]: `caption_dropout_rate` = 1.5 (set in [general]) must be between 0 and 1",
        "datasets[0].subsets[0]: `image_dir` = ",
        "missing' (set in datasets[0].subsets[0]) does not exist (looked for ",
        "`resize_interpolation` = 'bicubik' (set in datasets[0].subsets[0]) is not an interpolation; use one of "
        "lanczos, nearest, bilinear, linear, bicubic, cubic, area, box. did you mean 'bicubic'?",
        "`face_crop_aug_range` = [3.0, 2.0] (set in datasets[0].subsets[0]) must be [low, high] with 0 < low <= high",
        "`caption_extension` = 'txt' (set in datasets[0].subsets[0]) must start with a dot, e.g. '.txt'",
        "datasets[1]: `min_bucket_reso` = 300 (set in [general]) must not exceed max_bucket_reso = 128",
        "datasets[1]: `validation_split` = 1.0 (set in datasets[1]) must be at least 0 and below 1",
        "datasets[1].subsets[0]: `metadata_file` = ",
        "datasets[2].subsets[0]: `image_dir` = '' (set in datasets[2].subsets[0]) must not be empty",
        "piyo_md.json' (set in datasets[2].subsets[1]) is a file, not a folder",
    ]
    for text in expected:
        assert text in msg, text


def test_command_line_value_problem_names_the_option(tmp_path, image_factory):
    image_factory(tmp_path / "train" / "10_sks dog" / "a.png", (16, 16))
    args = parse(["--train_data_dir", str(tmp_path / "train"), "--caption_dropout_rate", "2", "--enable_bucket",
                  "--bucket_reso_steps", "48"])
    with pytest.raises(UserError) as exc:
        resolve_dataset_params(args, SUPPORT_TRAIN_NETWORK)
    msg = exc.value.message
    assert "--train_data_dir 10_sks dog: `caption_dropout_rate` = 2.0 (from --caption_dropout_rate on the command " \
           "line or in --config_file) must be between 0 and 1" in msg
    assert "`min_bucket_reso` = 256 (default) must be a positive multiple of bucket_reso_steps = 48" in msg


def test_toml_syntax_error_names_file_line_column(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('[general]\nshuffle_caption = true\n[[datasets]]\n  [[datasets.subsets]]\n'
                   '  image_dir = "C:\\hoge"\n')
    with pytest.raises(UserError) as exc:
        resolve(cfg)
    assert f"{cfg}: not valid TOML" in exc.value.message and "line 5, column" in exc.value.message


def test_non_utf8_config_is_named_and_bom_is_accepted(tmp_path, dirs):
    cfg = tmp_path / "cp932.toml"
    cfg.write_bytes("[general]\ncaption_prefix = '犬'\n".encode("cp932"))
    with pytest.raises(UserError, match=r"cp932.toml: not UTF-8 text .*save the file with UTF-8"):
        resolve(cfg)
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{dirs['hoge']}'\n".encode())
    assert len(resolve(bom).datasets) == 1


def test_structure_problems(tmp_path, dirs):
    cfg = write(tmp_path / "st.toml", "[general]\nflip_aug = true\n[dataset]\nresolution = 512\n")
    msg = error_of(cfg)
    assert "top level: unknown key `dataset`. did you mean 'datasets'?" in msg and "no [[datasets]]" in msg
    cfg = write(tmp_path / "st2.toml", "[datasets]\nresolution = 512\n")
    assert "must be written [[datasets]] (double brackets" in error_of(cfg)
    cfg = write(tmp_path / "st3.toml", "[[datasets]]\nresolution = 512\n")
    assert "datasets[0]: has no [[datasets.subsets]]" in error_of(cfg)
    cfg = write(tmp_path / "st4.toml", "[[datasets.subsets]]\nimage_dir = '{hoge}'\n", **dirs)
    assert "[[datasets.subsets]] must follow a [[datasets]] line" in error_of(cfg)
    cfg = write(tmp_path / "st5.toml", "[[general]]\nflip_aug = true\n[[datasets]]\n[[datasets.subsets]]\n"
                "image_dir = '{hoge}'\n", **dirs)
    assert "write [general] with single brackets (there is one general table), found [[general]]" in error_of(cfg)


def test_dataset_style_is_per_dataset_and_checked_against_script(tmp_path, dirs):
    mixed = write(tmp_path / "m.toml", """
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{hoge}'
  [[datasets.subsets]]
  metadata_file = '{md}'
""", **dirs)
    assert "datasets[0]: mixes DreamBooth-style subsets (datasets[0].subsets[0]: no metadata_file) and fine-tuning " \
           "subsets (datasets[0].subsets[1]: with metadata_file)" in error_of(mixed)
    ft = write(tmp_path / "ft.toml", "[[datasets]]\n  [[datasets.subsets]]\n  metadata_file = '{md}'\n", **dirs)
    assert "`metadata_file` is a fine-tuning option, but train_db.py only supports DreamBooth-style datasets" in \
        error_of(ft, support=SUPPORT_TRAIN_DB)
    db = write(tmp_path / "db.toml", "[general]\ncache_info = true\n[[datasets]]\n  [[datasets.subsets]]\n"
               "  image_dir = '{hoge}'\n  class_tokens = 'sks'\n", **dirs)
    msg = error_of(db, support=SUPPORT_FINE_TUNE)
    assert "[general]: `cache_info` is a DreamBooth-style option and fine_tune.py only supports fine-tuning" in msg
    assert "datasets[0].subsets[0]: `metadata_file` is required: fine_tune.py trains only from fine-tuning" in msg
    ft_with_db_key = write(tmp_path / "ftdb.toml", "[[datasets]]\ncaption_extension = '.txt'\n"
                           "  [[datasets.subsets]]\n  metadata_file = '{md}'\n", **dirs)
    assert "datasets[0]: `caption_extension` is a DreamBooth-style option, but this is a fine-tuning dataset" in \
        error_of(ft_with_db_key)


def test_caption_dropout_only_where_supported(tmp_path, dirs):
    cfg = write(tmp_path / "d.toml", "[general]\ncaption_dropout_rate = 0.1\n[[datasets]]\n  [[datasets.subsets]]\n"
                "  image_dir = '{hoge}'\n  caption_tag_dropout_rate = 0.2\n", **dirs)
    assert resolve(cfg).datasets[0].subsets[0].caption_dropout_rate == 0.1
    no_dropout = DatasetSupport(caption_dropout=False, script="train_textual_inversion.py")
    msg = error_of(cfg, support=no_dropout)
    assert "2 problems" in msg
    assert "[general]: `caption_dropout_rate` is not supported by train_textual_inversion.py" in msg
    assert "datasets[0].subsets[0]: `caption_tag_dropout_rate` is not supported by train_textual_inversion.py" in msg


def test_duplicate_subsets_skipped_within_dataset_kept_across(tmp_path, dirs):
    cfg = write(tmp_path / "dup.toml", """
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = '{hoge}'
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = '{hoge}/'
  num_repeats = 5
  [[datasets.subsets]]
  image_dir = '{fuga}'
[[datasets]]
resolution = 768
  [[datasets.subsets]]
  image_dir = '{hoge}'
[[datasets]]
  [[datasets.subsets]]
  metadata_file = '{md}'
  [[datasets.subsets]]
  metadata_file = '{md}'
""", **dirs)
    group = resolve(cfg)
    first, second, third = group.datasets
    assert [s.origin for s in first.subsets] == ["datasets[0].subsets[0]", "datasets[0].subsets[2]"]
    assert first.subsets[0].num_repeats == 2
    assert len(second.subsets) == 1 and second.resolution == (768, 768)
    assert len(third.subsets) == 1
    assert len(group.skipped) == 2
    assert "datasets[0].subsets[1] skipped: same image_dir" in group.skipped[0]
    assert "as datasets[0].subsets[0] in the same dataset" in group.skipped[0]
    assert "datasets[2].subsets[1] skipped: same metadata_file" in group.skipped[1]


def test_old_style_dreambooth_folders(tmp_path, image_factory):
    train, reg = tmp_path / "train", tmp_path / "reg"
    image_factory(train / "10_sks dog" / "a.png", (16, 16))
    image_factory(train / "5_my_char girl" / "b.jpg", (16, 16))
    image_factory(train / "0_unused" / "c.png", (16, 16))
    image_factory(train / "notes" / "d.png", (16, 16))
    image_factory(reg / "1_dog" / "r.png", (16, 16))
    args = parse(["--train_data_dir", str(train), "--reg_data_dir", str(reg), "--resolution", "512,768",
                  "--shuffle_caption", "--dataset_repeats", "9"])
    group = resolve_dataset_params(args, SUPPORT_TRAIN_NETWORK)
    assert group.source == "command line"
    (ds,) = group.datasets
    assert ds.kind == "dreambooth" and ds.resolution == (512, 768)
    got = [(s.origin, s.num_repeats, s.class_tokens, s.is_reg, Path(s.image_dir).name, s.shuffle_caption)
           for s in ds.subsets]
    assert got == [
        ("--train_data_dir 10_sks dog", 10, "sks dog", False, "10_sks dog", True),
        ("--train_data_dir 5_my_char girl", 5, "my_char girl", False, "5_my_char girl", True),
        ("--reg_data_dir 1_dog", 1, "dog", True, "1_dog", True),
    ]
    notes = "\n".join(group.skipped)
    assert "folder '0_unused' skipped: its repeat count is 0" in notes
    assert "folder 'notes' ignored: its name does not start with a repeat count" in notes


def test_old_style_images_directly_in_train_data_dir(tmp_path, image_factory):
    train = tmp_path / "train"
    image_factory(train / "img1.png", (16, 16))
    image_factory(train / "img2.png", (16, 16))
    with pytest.raises(UserError) as exc:
        resolve_dataset_params(parse(["--train_data_dir", str(train)]), SUPPORT_TRAIN_NETWORK)
    msg = exc.value.message
    assert f"No training data found in --train_data_dir {train}" in msg
    assert "holds 2 image(s) directly (e.g. 'img1.png')" in msg
    assert "must be the PARENT of folders named '<repeats>_<identifier> <class>'" in msg
    assert "10_sks dog/" in msg and "image_dir" in msg

    image_factory(train / "3_cat" / "c.png", (16, 16))
    group = resolve_dataset_params(parse(["--train_data_dir", str(train)]), SUPPORT_TRAIN_NETWORK)
    assert [s.num_repeats for s in group.datasets[0].subsets] == [3]
    assert any("2 image(s) directly in" in n and "not used" in n for n in group.skipped)


def test_old_style_missing_and_empty_dirs(tmp_path, image_factory):
    with pytest.raises(UserError, match="does not exist"):
        resolve_dataset_params(parse(["--train_data_dir", str(tmp_path / "nope")]), SUPPORT_TRAIN_NETWORK)
    (tmp_path / "empty" / "misc").mkdir(parents=True)
    with pytest.raises(UserError, match=r"holds no '<repeats>_<name>' folders \(folders found: 'misc'\)"):
        resolve_dataset_params(parse(["--train_data_dir", str(tmp_path / "empty")]), SUPPORT_TRAIN_NETWORK)
    image_factory(tmp_path / "t" / "2_x" / "a.png", (16, 16))
    image_factory(tmp_path / "r" / "a.png", (16, 16))
    with pytest.raises(UserError, match="No regularization images found in --reg_data_dir") as exc:
        resolve_dataset_params(parse(["--train_data_dir", str(tmp_path / "t"), "--reg_data_dir",
                                      str(tmp_path / "r")]), SUPPORT_TRAIN_NETWORK)
    assert f"'{tmp_path / 'r' / '1_dog'}'" in exc.value.message
    image_factory(tmp_path / "z" / "0_dog" / "a.png", (16, 16))
    with pytest.raises(UserError) as exc:
        resolve_dataset_params(parse(["--train_data_dir", str(tmp_path / "t"), "--reg_data_dir",
                                      str(tmp_path / "z")]), SUPPORT_TRAIN_NETWORK)
    assert "only '<repeats>_<name>' folders ('0_dog') have 0 repeats" in exc.value.message
    assert "holds no" not in exc.value.message
    with pytest.raises(UserError, match="needs training data: give --dataset_config"):
        resolve_dataset_params(parse([]), SUPPORT_TRAIN_NETWORK)


def test_old_style_fine_tuning(tmp_path, dirs):
    args = parse(["--in_json", str(dirs["md"]), "--train_data_dir", str(dirs["piyo"]), "--dataset_repeats", "3",
                  "--train_batch_size", "2"], SUPPORT_FINE_TUNE)
    (ds,) = resolve_dataset_params(args, SUPPORT_FINE_TUNE).datasets
    (s,) = ds.subsets
    assert ds.kind == "finetuning" and ds.batch_size == 2
    assert (s.metadata_file, s.image_dir, s.num_repeats) == (str(dirs["md"]), str(dirs["piyo"]), 3)
    assert s.origin == f"--in_json {dirs['md']}"
    network_args = parse(["--in_json", str(dirs["md"]), "--reg_data_dir", str(dirs["reg"])])
    group = resolve_dataset_params(network_args, SUPPORT_TRAIN_NETWORK)
    assert group.datasets[0].kind == "finetuning" and group.datasets[0].subsets[0].image_dir is None
    assert group.skipped == ["--reg_data_dir ignored: fine-tuning style datasets (--in_json) have no "
                             "regularization images"]
    with pytest.raises(UserError, match="fine_tune.py needs training data"):
        resolve_dataset_params(parse(["--train_data_dir", str(dirs["piyo"])], SUPPORT_FINE_TUNE), SUPPORT_FINE_TUNE)
    with pytest.raises(UserError, match="metadata_file` = .*does not exist"):
        resolve_dataset_params(parse(["--in_json", str(tmp_path / "x.json")], SUPPORT_FINE_TUNE), SUPPORT_FINE_TUNE)


def test_old_style_options_ignored_with_dataset_config(tmp_path, dirs, image_factory):
    image_factory(tmp_path / "train" / "10_a" / "a.png", (16, 16))
    cfg = write(tmp_path / "c.toml", PRECEDENCE.format(g="", d="", s="", hoge="{hoge}"), **dirs)
    group = resolve(cfg, "--train_data_dir", str(tmp_path / "train"), "--in_json", str(dirs["md"]))
    assert [Path(s.image_dir).name for s in group.datasets[0].subsets] == ["hoge"]
    assert "--train_data_dir, --in_json ignored because --dataset_config" in group.skipped[0]


def test_checker_tool(tmp_path, dirs, capsys):
    cfg = write(tmp_path / "cfg.toml", SEED_EXAMPLE, **dirs)
    assert check_main([str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "datasets[0].subsets[1]" in out and "keep_tokens = 3" in out and f"OK: {cfg} is valid" in out
    proc = subprocess.run([sys.executable, "-m", "library.config.dataset_config", str(cfg), "--script",
                           "train_db.py"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "`metadata_file` is a fine-tuning option, but train_db.py" in proc.stderr


def test_run_config_values_count_as_command_line_level(tmp_path, dirs):
    from library.config.run_config import load_run_config

    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser, SUPPORT_TRAIN_NETWORK)
    add_config_file_arguments(parser)
    run = tmp_path / "run.toml"
    run.write_text(f"[dataset]\ndataset_config = '{tmp_path / 'ds.toml'}'\nkeep_tokens = 6\nflip_aug = true\n")
    write(tmp_path / "ds.toml", PRECEDENCE.format(g="keep_tokens = 2", d="", s="", hoge="{hoge}"), **dirs)
    args = load_run_config(parser, ["--config_file", str(run)])
    (s,) = resolve_dataset_params(args, SUPPORT_TRAIN_NETWORK).datasets[0].subsets
    assert (s.keep_tokens, s.flip_aug) == (2, True)
    write(tmp_path / "ds.toml", PRECEDENCE.format(g="", d="", s="", hoge="{hoge}"), **dirs)
    (s,) = resolve_dataset_params(args, SUPPORT_TRAIN_NETWORK).datasets[0].subsets
    assert s.keep_tokens == 6
