"""vlm_train.py on tiny random-weight LLaVA-OneVision and Qwen2.5-VL models: learning on held-out data, the
adapter (LoRA + projector) and its reload, merge, bit-exact resume, full fine-tuning, QLoRA, options and configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.errors import UserError
from tests.vlm_helpers import held_out_loss, shapes_dataset

FAMILIES = ("llava_onevision", "qwen2_5_vl")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from library.vlm.tiny import save_tiny_vlm

    root = tmp_path_factory.mktemp("tiny_vlm")
    return {f: save_tiny_vlm(root / f, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_dataset(tmp_path_factory.mktemp("shapes"))


def _argv(model: Path, data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--model_local_path", str(model), "--data_path", str(data["train"]), "--eval_data_path",
            str(data["eval"]), "--image_folder", str(data["folder"]), "--output_dir", str(out),
            "--learning_rate", "1e-2", "--train_batch_size", "4", "--lora_dropout", "0", "--seed", "0", *extra]


def _train(argv: list[str]):
    """Train like vlm_train.py and keep the recipe (its in-memory model) for comparisons."""
    import vlm_train
    from library.config.run_config import load_run_config
    from library.vlm.training import stage1_recipe, targets_from_args, train_vlm

    args = load_run_config(vlm_train.build_parser(), argv)
    kept = {}
    make = stage1_recipe(args)

    def make_recipe(vlm, data):
        kept["recipe"] = make(vlm, data)
        return kept["recipe"]

    path = train_vlm(args, make_recipe, extra_problems=targets_from_args(args).problems())
    return path, kept["recipe"]


def _base(folder: Path):
    from library.vlm.loading import load_vlm

    return load_vlm(folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_learns_saves_projector_and_reloads_identically(tiny, shapes, tmp_path, family):
    from peft import PeftModel

    out = tmp_path / "out"
    final, recipe = _train(_argv(tiny[family], shapes, out, "--max_train_steps", "30", "--gradient_checkpointing",
                                 "--validate_every_n_steps", "10", "--logging_dir", str(tmp_path / "logs"),
                                 "--log_with", "tensorboard"))
    assert final == out / "last" and (final / "adapter_config.json").is_file()
    config = json.loads((final / "adapter_config.json").read_text())
    base = _base(tiny[family])
    projector = base.family.projector
    assert config["modules_to_save"] == [projector] and "language_model" in config["target_modules"]
    saved = load_file(str(final / "adapter_model.safetensors"))
    assert any(projector.split(".")[-1] in k for k in saved) and any("lora_A" in k for k in saved)
    assert not any("visual.blocks" in k or "vision_tower" in k for k in saved if "lora" in k)
    info = json.loads((final / "vlm_training.json").read_text())
    assert info["global_step"] == 30 and info["family"] == family
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))

    start = held_out_loss(base.model, base.family, base.tokenizer, shapes["eval"], shapes["folder"])
    tuned = PeftModel.from_pretrained(base.model, str(final)).eval()
    after = held_out_loss(tuned, base.family, base.tokenizer, shapes["eval"], shapes["folder"])
    assert after <= 0.7 * start, (start, after)

    from library.vlm.data import DataOptions, load_conversations
    from library.vlm.encoding import ConversationEncoder, collate, model_inputs

    encoder = ConversationEncoder(base.family, base.tokenizer)
    samples = load_conversations(shapes["eval"], DataOptions(shapes["folder"]))
    batch = model_inputs(collate(base.family, [encoder.encode(s) for s in samples], base.tokenizer.pad_token_id),
                         torch.device("cpu"), torch.float32)
    recipe.model.eval()
    with torch.no_grad():
        assert torch.equal(recipe.model(**batch).logits, tuned(**batch).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_model_loads_offline_and_matches_base_plus_adapter(tiny, shapes, tmp_path, family):
    from peft import PeftModel
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    import vlm_merge_lora_weights
    from library.vlm.data import DataOptions, load_conversations
    from library.vlm.encoding import ConversationEncoder, collate, model_inputs

    final, _ = _train(_argv(tiny[family], shapes, tmp_path / "out", "--max_train_steps", "8"))
    merged_dir = tmp_path / "merged"
    vlm_merge_lora_weights.main(["--base_model", str(tiny[family]), "--lora_path", str(final), "--output_path",
                                 str(merged_dir)])
    merged = AutoModelForImageTextToText.from_pretrained(str(merged_dir), local_files_only=True).eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    AutoTokenizer.from_pretrained(str(merged_dir), local_files_only=True)
    AutoImageProcessor.from_pretrained(str(merged_dir), local_files_only=True)
    base = _base(tiny[family])
    adapted = PeftModel.from_pretrained(base.model, str(final)).eval()
    encoder = ConversationEncoder(base.family, base.tokenizer)
    samples = load_conversations(shapes["eval"], DataOptions(shapes["folder"]))
    batch = model_inputs(collate(base.family, [encoder.encode(s) for s in samples], base.tokenizer.pad_token_id),
                         torch.device("cpu"), torch.float32)
    with torch.no_grad():
        difference = (merged(**batch).logits - adapted(**batch).logits).abs().max().item()
    assert difference < 1e-4
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        vlm_merge_lora_weights.main(["--lora_path", str(final), "--output_path", str(merged_dir)])


def test_resume_is_bit_exact_with_accumulation(tiny, shapes, tmp_path):
    common = ["--max_train_steps", "6", "--gradient_accumulation_steps", "2", "--train_batch_size", "2",
              "--lora_dropout", "0.1"]
    full = tmp_path / "full"
    _train(_argv(tiny["llava_onevision"], shapes, full, *common))
    part = tmp_path / "part"
    _train(_argv(tiny["llava_onevision"], shapes, part, *common, "--save_every_n_steps", "3", "--save_state"))
    state = part / "last-step00000003-state"
    assert state.is_dir() and (part / "last-step00000003" / "adapter_config.json").is_file()
    resumed = tmp_path / "resumed"
    _train(_argv(tiny["llava_onevision"], shapes, resumed, *common, "--resume", str(state)))
    a = load_file(str(full / "last" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "last" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="already has files"):
        _train(_argv(tiny["llava_onevision"], shapes, full, *common))


def test_full_fine_tuning_writes_a_complete_model(tiny, shapes, tmp_path):
    from transformers import AutoModelForImageTextToText

    final, recipe = _train(_argv(tiny["qwen2_5_vl"], shapes, tmp_path / "out", "--no-use_lora", "--max_train_steps",
                                 "3", "--learning_rate", "1e-3", "--no-train_vision_projector"))
    names = {n for n, p in recipe.model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("model.language_model.", "lm_head.")) for n in names)
    model = AutoModelForImageTextToText.from_pretrained(str(final), local_files_only=True)
    assert (final / "tokenizer.json").is_file() and (final / "preprocessor_config.json").is_file()
    trained = dict(recipe.model.named_parameters())
    assert torch.equal(model.state_dict()["lm_head.weight"], trained["lm_head.weight"].detach())


def test_vision_lora_and_target_modules(tiny, shapes, tmp_path):
    final, recipe = _train(_argv(tiny["qwen2_5_vl"], shapes, tmp_path / "out", "--max_train_steps", "1",
                                 "--lora_target_modules", "q_proj", "v_proj", "--use_vision_lora"))
    lora = [n for n, p in recipe.model.named_parameters() if p.requires_grad and "lora_A" in n]
    assert any("language_model" in n and "q_proj" in n for n in lora)
    assert not any("language_model" in n and ("k_proj" in n or "mlp" in n) for n in lora)
    assert any("visual.blocks" in n for n in lora) and not any("merger" in n for n in lora)
    with pytest.raises(UserError, match="--lora_target_modules qq_proj: no such linear layer"):
        _train(_argv(tiny["qwen2_5_vl"], shapes, tmp_path / "bad", "--lora_target_modules", "qq_proj"))


def test_q_lora_learns_on_cpu_and_its_adapter_reloads(tiny, shapes, tmp_path):
    pytest.importorskip("bitsandbytes")  # pinned; bitsandbytes 0.50.2 runs 4-bit NF4 on the CPU
    from peft import PeftModel

    from library.vlm.loading import load_vlm

    family = "llava_onevision"
    final, recipe = _train(_argv(tiny[family], shapes, tmp_path / "out", "--q_lora", "--max_train_steps", "30",
                                 "--validate_every_n_steps", "10"))
    assert any(type(m).__name__ == "Linear4bit" for m in recipe.model.modules())
    saved = load_file(str(final / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in saved) and any("multi_modal_projector" in k for k in saved)
    assert all(v.dtype == torch.float32 for v in saved.values())  # the adapter holds no quantized weights

    base = load_vlm(tiny[family], bits=4)
    start = held_out_loss(base.model, base.family, base.tokenizer, shapes["eval"], shapes["folder"])
    tuned = PeftModel.from_pretrained(base.model, str(final)).eval()
    after = held_out_loss(tuned, base.family, base.tokenizer, shapes["eval"], shapes["folder"])
    assert after <= 0.7 * start, (start, after)
    recipe.model.eval()
    assert held_out_loss(recipe.model, base.family, base.tokenizer, shapes["eval"], shapes["folder"]) == after


def test_q_lora_without_bitsandbytes_is_refused_before_loading(tiny, shapes, tmp_path, hide_module):
    hide_module("bitsandbytes")
    with pytest.raises(UserError, match="need the bitsandbytes package.*pip install bitsandbytes==0.50.2"):
        _train(_argv(tiny["llava_onevision"], shapes, tmp_path / "out", "--q_lora", "--max_train_steps", "2"))
    assert not (tmp_path / "out" / "last").exists()


def test_options_are_checked_before_any_model_loads(tiny, shapes, tmp_path):
    with pytest.raises(UserError) as err:
        _train(["--output_dir", str(tmp_path), "--deepspeed", "zero2.json", "--train_vision_encoder",
                "--train_batch_size", "0"])
    text = err.value.message
    for expected in ("give the base model", "give the training data", "--deepspeed zero2.json",
                     "--train_vision_encoder with LoRA", "--train_batch_size must be >= 1"):
        assert expected in text
    with pytest.raises(UserError, match="did you mean --lora_alpha"):
        _train(_argv(tiny["qwen2_5_vl"], shapes, tmp_path / "o", "--lora_alhpa", "8"))
    bad = tmp_path / "bad_model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "blip"}))
    with pytest.raises(UserError, match="model_type 'blip' is not supported"):
        _train(_argv(bad, shapes, tmp_path / "o2", "--max_train_steps", "1"))
    with pytest.raises(UserError, match="not in the local Hugging Face cache and the hub is switched off"):
        _train(_argv("nobody/no-such-vlm", shapes, tmp_path / "o3", "--max_train_steps", "1"))


def test_config_file_and_caption_folder(tiny, tmp_path):
    import vlm_train
    from tests.vlm_helpers import draw

    folder = tmp_path / "captions"
    for i, colour in enumerate(("red", "blue", "green")):
        draw("circle", colour, folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} circle", encoding="utf-8")
    config = tmp_path / "run.toml"
    argv = ["--model_local_path", str(tiny["llava_onevision"]), "--caption_folder", str(folder), "--output_dir",
            str(tmp_path / "out"), "--max_train_steps", "2", "--lora_r", "4", "--config_file", str(config)]
    with pytest.raises(SystemExit):
        vlm_train.main(argv + ["--output_config"])
    assert "lora_r = 4" in config.read_text()
    final = vlm_train.main(["--config_file", str(config)])
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 4


def test_two_processes_train_save_and_resume(tiny, shapes, tmp_path):
    from tests.train_helpers import run_script

    common = ["--max_train_steps", "4", "--train_batch_size", "2", "--save_state", "--save_every_n_steps", "2",
              "--validate_every_n_steps", "2"]
    first = run_script(_argv(tiny["llava_onevision"], shapes, tmp_path / "a", *common), processes=2,
                       script="vlm_train.py")
    assert first.returncode == 0, first.stderr[-3000:]
    state = tmp_path / "a" / "last-step00000002-state"
    assert (state / "rng_0.pt").is_file() and (state / "rng_1.pt").is_file()
    second = run_script(_argv(tiny["llava_onevision"], shapes, tmp_path / "b", *common, "--resume", str(state)),
                        processes=2, script="vlm_train.py")
    assert second.returncode == 0, second.stderr[-3000:]
    a = load_file(str(tmp_path / "a" / "last" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
