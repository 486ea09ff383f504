"""Captioner LoRA training (train_blip_network.py, train_florence_lora.py) with tiny random-weight models built
in the tests: learning, adapter files, reload, merge, padding, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.errors import UserError
from tests.captioner_helpers import build_tiny_blip, build_tiny_florence2, make_pairs

TARGETS = {"blip": ["self.query", "self.value", "crossattention.output.dense"],
           "florence2": ["q_proj", "v_proj", "out_proj"]}


def _script(family: str):
    import train_blip_network
    import train_florence_lora

    return train_blip_network if family == "blip" else train_florence_lora


def _argv(family: str, model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    paths = [str(data), str(out)] if family == "blip" else ["--dataset_dir", str(data), "--output_dir", str(out)]
    return [*paths, "--model_id", str(model), "--rank", "8", "--alpha", "16", "--dropout", "0", "--learning_rate",
            "1e-2", "--batch_size", "4", "--val_split", "0.34", "--seed", "0", *extra]


@pytest.fixture(scope="module", params=["blip", "florence2"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(family, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(f"tiny_{family}") / "model"
    return build_tiny_blip(folder) if family == "blip" else build_tiny_florence2(folder)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pairs") / "data"
    make_pairs(folder, 12)
    return folder


@pytest.fixture(scope="module")
def trained(family, model_dir, data_dir, tmp_path_factory) -> Path:
    """30 steps with held-out validation every 10 steps, samples, step saves, a final state and a merge."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp(f"run_{family}") / "out"
    final = _script(family).main(_argv(family, model_dir, data_dir, out, "--max_train_steps", "30",
                                       "--target_modules", *TARGETS[family], "--validate_every_n_steps", "10",
                                       "--sample_every_n_steps", "15", "--save_every_n_steps", "10",
                                       "--save_state_on_train_end", "--log_with", "tensorboard", "--merge"))
    assert final == out
    return out


def _scalars(out: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in (out / "logs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def test_held_out_loss_drops_and_is_logged_before_and_during(trained):
    current = _scalars(trained, "loss/validation/current")
    by_epoch = _scalars(trained, "loss/validation/epoch")
    assert sorted(current) == [0, 10, 20]  # before training, then every 10 steps
    assert max(by_epoch) == 30
    assert by_epoch[30] <= 0.7 * current[0], (current, by_epoch)


def test_adapter_files_saves_samples_and_targets(trained):
    assert (trained / "adapter_model.safetensors").is_file()
    for step in (10, 20):
        assert (trained / f"lora-step{step:08d}" / "adapter_config.json").is_file()
    samples = sorted((trained / "samples").glob("*.txt"))
    assert len(samples) == 2 and "generated:" in samples[0].read_text()


def test_targets_equal_the_cli_list(trained, family):
    config = json.loads((trained / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(TARGETS[family])
    lora = load_file(str(trained / "adapter_model.safetensors"))
    assert any("text_decoder" in k or "language_model.decoder" in k for k in lora)  # the decoder trains


def _batch(family: str, model_dir: Path, data_dir: Path):
    from library.captioners.families import FAMILIES, load_captioner
    from library.captioners.recipe import open_image

    captioner = load_captioner(FAMILIES[family], str(model_dir), task="<DETAILED_CAPTION>")
    images = sorted(data_dir.glob("*.png"))[:3]
    texts = [p.with_suffix(".txt").read_text().strip() for p in images]
    texts[1] = texts[1].replace("a ", "", 1)  # different lengths, so the batch has padding
    inputs = captioner.training_inputs([open_image(p) for p in images], captioner.tokenize_captions(texts))
    return captioner, inputs


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_reloaded_adapter_has_the_trained_weights_and_merge_matches(trained, family, model_dir, data_dir):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText

    captioner, inputs = _batch(family, model_dir, data_dir)
    reloaded = PeftModel.from_pretrained(captioner.model, str(trained)).eval()
    from library.captioners.families import FAMILIES, load_captioner

    fresh = load_captioner(FAMILIES[family], str(model_dir)).model
    in_memory = get_peft_model(fresh, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS[family])).eval()
    state = load_file(str(trained / "lora-state" / "weights.safetensors"))  # the trained tensors, as in memory
    with torch.no_grad():
        params = dict(in_memory.named_parameters())
        for name, value in state.items():
            params[name].copy_(value)
    adapter_logits = _logits(reloaded, inputs)
    assert torch.equal(adapter_logits, _logits(in_memory, inputs))
    merged = AutoModelForImageTextToText.from_pretrained(str(trained / "merged")).eval()
    assert not any("lora_" in k for k in merged.state_dict())
    assert torch.allclose(_logits(merged, inputs), adapter_logits, atol=1e-4)
    with reloaded.disable_adapter():
        assert not torch.allclose(_logits(reloaded, inputs), adapter_logits, atol=1e-3)  # the LoRA changed it


def test_loss_ignores_padding_and_starts_like_generate(family, model_dir, data_dir):
    captioner, inputs = _batch(family, model_dir, data_dir)
    labels = inputs["labels"]
    assert (labels == -100).any()
    if family == "blip":
        assert (inputs["input_ids"][:, 0] == captioner.model.config.text_config.bos_token_id).all()
        assert (inputs["labels"][inputs["attention_mask"] == 0] == -100).all()
    else:
        prompt = captioner.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=False)
        assert "describe in detail" in prompt  # the task prompt goes to the encoder
    model = captioner.model.eval()
    padded = dict(inputs)
    extra = 5
    pad = captioner.tokenizer.pad_token_id
    padded["labels"] = torch.cat([labels, torch.full((len(labels), extra), -100)], dim=1)
    if family == "blip":
        padded["input_ids"] = torch.cat([inputs["input_ids"], torch.full((len(labels), extra), pad)], dim=1)
        padded["attention_mask"] = torch.cat([inputs["attention_mask"], torch.zeros(len(labels), extra,
                                                                                    dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model(**inputs).loss, model(**padded).loss, atol=1e-6)


def test_resume_is_bit_exact_with_accumulation(tmp_path, model_dir, data_dir, family):
    torch.set_num_threads(1)
    common = ["--max_train_steps", "5", "--gradient_accumulation_steps", "2", "--batch_size", "2",
              "--dropout", "0.1", "--val_split", "0.34"]
    script = _script(family)
    full = script.main(_argv(family, model_dir, data_dir, tmp_path / "a", *common))
    script.main(_argv(family, model_dir, data_dir, tmp_path / "b", *common, "--save_every_n_steps", "3",
                      "--save_state"))
    state = tmp_path / "b" / "lora-step00000003-state"
    assert state.is_dir()
    resumed = script.main(_argv(family, model_dir, data_dir, tmp_path / "b", *common, "--resume", str(state)))
    a = load_file(str(full / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="already has files"):  # never overwritten
        script.main(_argv(family, model_dir, data_dir, tmp_path / "a", *common))


def test_refusals_before_the_model_loads(tmp_path, model_dir, data_dir, family):
    script = _script(family)
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        script.main(_argv(family, model_dir, data_dir, out, "--quantize", "--optimizer_name", "Flora"))
    message = err.value.message
    assert "--quantize" in message and ("bitsandbytes" in message or "CUDA" in message)
    assert "flora-opt" in message or "flora_opt" in message
    assert not out.exists()
    with pytest.raises(UserError, match="no Linear module"):
        script.main(_argv(family, model_dir, data_dir, out, "--target_modules", "nope_proj", "--max_train_steps", "1"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(UserError, match="train_florence_lora.py"):
        script.main(_argv(family, other, data_dir, out))
    assert not out.exists()
    with pytest.raises(UserError, match="did you mean"):
        script.main(_argv(family, model_dir, data_dir, out, "--learnig_rate", "1"))
