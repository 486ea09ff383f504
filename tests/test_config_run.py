"""--config_file / --output_config: validation against the parser, precedence, round trip."""

from __future__ import annotations

import argparse
import tomllib

import pytest

from library.config.arguments import SUPPORT_TRAIN_NETWORK, add_config_file_arguments, add_dataset_arguments
from library.config.run_config import load_run_config
from library.errors import UserError


def int_or_float(text: str) -> float:
    value = float(text)
    return int(value) if value.is_integer() else value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser, SUPPORT_TRAIN_NETWORK)
    add_config_file_arguments(parser)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--max_train_steps", type=int, default=1600)
    parser.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--optimizer_args", type=str, nargs="*", default=None)
    parser.add_argument("--lr_warmup_steps", type=int_or_float, default=0)
    parser.add_argument("--no_half_vae", action="store_true")
    parser.add_argument("--wandb_api_key", type=str, default=None)
    parser.add_argument("--huggingface_token", type=str, default=None)
    parser.add_argument("--output_name", type=str, default=None)
    return parser


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_sections_flattened_converted_and_cli_overrides(tmp_path):
    cfg = write(tmp_path / "run.toml", """
[model]
output_name = "mylora"
[training]
learning_rate = 3e-4
max_train_steps = 100
mixed_precision = "bf16"
optimizer_args = ["weight_decay=0.01", "betas=.9,.999"]
lr_warmup_steps = 0.1
no_half_vae = true
[dataset]
resolution = 768
train_batch_size = 2
face_crop_aug_range = "2.0,4.0"
""")
    args = load_run_config(make_parser(), ["--config_file", str(cfg), "--max_train_steps", "50"])
    assert args.output_name == "mylora"
    assert args.learning_rate == pytest.approx(3e-4)
    assert args.max_train_steps == 50  # command line wins over the file
    assert args.mixed_precision == "bf16"
    assert args.optimizer_args == ["weight_decay=0.01", "betas=.9,.999"]
    assert args.lr_warmup_steps == pytest.approx(0.1)
    assert args.no_half_vae is True
    assert args.resolution == "768"  # kept as the string sd-scripts' option holds
    assert args.train_batch_size == 2
    assert args.face_crop_aug_range == "2.0,4.0"
    assert args.caption_extension == ".caption"  # untouched default


def test_resolution_and_face_crop_accept_toml_lists(tmp_path):
    cfg = write(tmp_path / "run.toml", "resolution = [512, 768]\nface_crop_aug_range = [2.0, 4.0]\n")
    args = load_run_config(make_parser(), ["--config_file", str(cfg)])
    assert (args.resolution, args.face_crop_aug_range) == ("512,768", "2.0,4.0")


def test_toml_suffix_is_appended(tmp_path):
    write(tmp_path / "run.toml", "max_train_steps = 7\n")
    args = load_run_config(make_parser(), ["--config_file", str(tmp_path / "run")])
    assert args.max_train_steps == 7


def test_every_problem_reported_at_once(tmp_path):
    cfg = write(tmp_path / "bad.toml", """
[training]
learnig_rate = 1e-4
max_train_steps = "ten"
mixed_precision = "fp61"
no_half_vae = "yes"
resolution = "512x768"
[other]
max_train_steps = 3
""")
    with pytest.raises(UserError) as exc:
        load_run_config(make_parser(), ["--config_file", str(cfg)])
    msg = exc.value.message
    assert "bad.toml" in msg and "6 problems" in msg
    assert "`learnig_rate`: unknown option. did you mean 'learning_rate'?" in msg
    assert "`max_train_steps`: expected an integer, found 'ten' (string)" in msg
    assert "'fp61' (string) is not one of: no, fp16, bf16. did you mean 'fp16'?" in msg
    assert "`no_half_vae`: is a flag: expected true or false, found 'yes' (string)" in msg
    assert "`resolution`" in msg and "512x768" in msg
    assert "`max_train_steps` is set twice ([training] and [other])" in msg


def test_float_given_to_int_and_list_to_scalar_rejected(tmp_path):
    cfg = write(tmp_path / "bad.toml", "max_train_steps = 1.5\nlearning_rate = [1, 2]\nconfig_file = 'x'\n")
    with pytest.raises(UserError) as exc:
        load_run_config(make_parser(), ["--config_file", str(cfg)])
    msg = exc.value.message
    assert "expected an integer, found 1.5 (number)" in msg
    assert "`learning_rate`: expected a number, found [1, 2] (list)" in msg
    assert "`config_file` cannot be set in a config file" in msg


def test_missing_file_and_toml_syntax_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_run_config(make_parser(), ["--config_file", str(tmp_path / "nope.toml")])
    cfg = write(tmp_path / "broken.toml", "learning_rate = 1e-4\nmixed_precision = bf16\n")
    with pytest.raises(UserError) as exc:
        load_run_config(make_parser(), ["--config_file", str(cfg)])
    assert "broken.toml" in exc.value.message and "line 2" in exc.value.message
    utf16 = tmp_path / "utf16.toml"
    utf16.write_text("learning_rate = 1e-4\n", encoding="utf-16")
    with pytest.raises(UserError, match=r"utf16.toml: not UTF-8 text"):
        load_run_config(make_parser(), ["--config_file", str(utf16)])


def test_output_config_round_trip_without_secrets(tmp_path):
    out = tmp_path / "saved"
    argv = ["--learning_rate", "2e-4", "--mixed_precision", "fp16", "--optimizer_args", "a=1", "b=2",
            "--shuffle_caption", "--wandb_api_key", "SECRET1", "--huggingface_token", "SECRET2",
            "--resolution", "512,768", "--config_file", str(out), "--output_config"]
    with pytest.raises(SystemExit) as exc:
        load_run_config(make_parser(), argv)
    assert exc.value.code == 0
    path = tmp_path / "saved.toml"
    text = path.read_text()
    assert "SECRET" not in text and "wandb_api_key" not in text and "huggingface_token" not in text
    data = tomllib.loads(text)
    assert data == {"learning_rate": 2e-4, "mixed_precision": "fp16", "optimizer_args": ["a=1", "b=2"],
                    "shuffle_caption": True, "resolution": "512,768"}
    loaded = load_run_config(make_parser(), ["--config_file", str(path)])
    assert loaded.learning_rate == pytest.approx(2e-4) and loaded.shuffle_caption is True
    assert loaded.optimizer_args == ["a=1", "b=2"] and loaded.resolution == "512,768"

    with pytest.raises(UserError, match="already exists"):
        load_run_config(make_parser(), argv)
    assert path.read_text() == text


def test_output_config_needs_config_file():
    with pytest.raises(UserError, match="--output_config needs --config_file"):
        load_run_config(make_parser(), ["--output_config"])


def test_no_config_file_is_plain_parse():
    args = load_run_config(make_parser(), ["--keep_tokens", "2"])
    assert args.keep_tokens == 2 and args.config_file is None
