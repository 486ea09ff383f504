"""finetune/compile_captions.py, and captioning with a trained LoRA: finetune/make_captions.py --peft_model
(BLIP) and finetune/make_captions_by_florence2.py (Florence-2), with tiny models built in the tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from library.errors import UserError
from tests.captioner_helpers import build_tiny_blip, build_tiny_florence2, make_pairs

REPO_ROOT = Path(__file__).resolve().parent.parent


def _compile(argv: list[str]) -> Path:
    sys.path.insert(0, str(REPO_ROOT / "finetune"))
    try:
        import compile_captions
    finally:
        sys.path.pop(0)
    return compile_captions.main(argv)


def test_compile_captions_pairs_lists_and_is_optional_about_output(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg", "c.png", "lonely.png"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(data / name)
    (data / "a.txt").write_text("a red\ncircle \n", encoding="utf-8")
    (data / "sub" / "b.txt").write_text("  a blue square\n", encoding="utf-8")
    (data / "c.txt").write_text("green", encoding="utf-8")
    (data / "orphan.txt").write_text("no image", encoding="utf-8")
    path = _compile([str(data)])
    assert path == data / "metadata.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"file_name": "a.png", "text": "a red circle"}, {"file_name": "c.png", "text": "green"},
                    {"file_name": "sub/b.jpg", "text": "a blue square"}]
    out = capsys.readouterr().out
    assert "lonely.png" in out and "orphan.txt" in out
    _compile([str(data)])  # a re-run replaces the file, no duplicates
    assert len(path.read_text().splitlines()) == 3
    other = _compile([str(data), str(tmp_path / "meta"), "--caption_extension", "txt"])
    first = json.loads(other.read_text().splitlines()[0])
    assert first["file_name"] == "../data/a.png" and (other.parent / first["file_name"]).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    Image.new("RGB", (8, 8)).save(empty / "x.png")
    with pytest.raises(UserError, match="no image has a caption file"):
        _compile([str(empty)])
    assert not (empty / "metadata.jsonl").exists()


def test_compile_captions_cli_exit_status(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "finetune" / "compile_captions.py"), str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no image has a caption file" in result.stderr


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(base model, trained adapter) per family, trained on the toolkit's own metadata.jsonl."""
    import train_blip_network
    import train_florence_lora

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("adapters")
    data = root / "data"
    make_pairs(data, 8)
    _compile([str(data)])
    result = {}
    for family, build, script in (("blip", build_tiny_blip, train_blip_network),
                                  ("florence2", build_tiny_florence2, train_florence_lora)):
        model = build(root / f"{family}_model")
        out = root / f"{family}_lora"
        paths = [str(data), str(out)] if family == "blip" else ["--dataset_dir", str(data), "--output_dir", str(out)]
        script.main([*paths, "--model_id", str(model), "--max_train_steps", "20", "--learning_rate", "1e-2",
                     "--batch_size", "4", "--seed", "1"])
        result[family] = (model, out)
    return result


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "todo"
    make_pairs(folder, 3)
    for caption in folder.glob("*.txt"):
        caption.unlink()
    return folder


def _texts(folder: Path, extension: str) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob(f"*{extension}"))}


def test_blip_make_captions_with_peft_model(adapters, images):
    from library.tools import blip_captioner as bc

    model, lora = adapters["blip"]

    def run(*extra: str) -> None:
        bc.run(bc.build_parser().parse_args([str(images), "--model_id", str(model), "--beam_search",
                                             "--max_length", "12", "--caption_extension", ".txt", *extra]))

    run("--peft_model", str(lora))
    with_lora = _texts(images, ".txt")
    assert len(with_lora) == 3 and all(t.strip() for t in with_lora.values())
    (images / next(iter(with_lora))).write_text("kept\n", encoding="utf-8")
    run("--peft_model", str(lora))
    assert _texts(images, ".txt")[next(iter(with_lora))] == "kept\n"  # skip existing
    run("--overwrite")
    without = _texts(images, ".txt")
    assert without != with_lora  # the LoRA changes the captions
    with pytest.raises(UserError, match="adapter_config.json"):
        run("--peft_model", str(images), "--overwrite")


def _florence(argv: list[str]) -> None:
    from library.captioners.florence_captioner import build_parser, run

    run(build_parser().parse_args(argv))


def test_florence2_captioner(adapters, images, capsys):
    model, lora = adapters["florence2"]
    (images / "broken.png").write_bytes(b"not an image")
    _florence([str(images), "--model_id", str(model), "--peft_model", str(lora), "--batch_size", "2",
               "--num_beams", "2", "--max_length", "10"])
    first = _texts(images, ".txt")
    assert len(first) == 3 and all(t.strip() for t in first.values())
    assert "broken.png" in capsys.readouterr().out  # skipped and named
    name = next(iter(first))
    (images / name).write_text("kept\n", encoding="utf-8")
    # the seed's inference_florence.py flags
    _florence(["--images", str(images), "--base_model", str(model), "--peft_model", str(lora), "--beams", "2",
               "--max_token_length", "10", "--save_captions", "--caption_extension", "caption"])
    assert _texts(images, ".caption") == {k.replace(".txt", ".caption"): v for k, v in first.items()}
    assert _texts(images, ".txt")[name] == "kept\n"
    _florence([str(images), "--model_id", str(model), "--peft_model", str(lora), "--num_beams", "2",
               "--max_length", "10", "--overwrite"])
    assert _texts(images, ".txt") == first  # deterministic; --overwrite replaced the kept one


def test_florence2_captioner_refuses_remote_code_and_missing_models(tmp_path, images, adapters):
    model, _ = adapters["florence2"]
    remote = tmp_path / "remote"
    shutil.copytree(model, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration"}
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="trust_remote_code"):
        _florence([str(images), "--model_id", str(remote)])
    with pytest.raises(UserError, match="neither a model folder"):
        _florence([str(images), "--model_id", str(tmp_path / "missing" / "deep" / "x")])
