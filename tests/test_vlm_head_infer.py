"""Stage 2 (vlm_train_add_head.py) and inference (vlm_infer.py) on tiny random-weight models: the head learns a
yes/no rule on generated images, pools a position that has seen the image, is saved beside the adapter and
loaded by inference; inference writes its JSON without the gold answers in the prompts."""

from __future__ import annotations

import json

import pytest
import torch

from library.errors import UserError
from tests.vlm_helpers import conversation, draw, shapes_dataset, yesno_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from library.vlm.tiny import save_tiny_vlm

    return save_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm") / "llava", "llava_onevision")


@pytest.fixture(scope="module")
def stage1(tiny, tmp_path_factory):
    import vlm_train

    root = tmp_path_factory.mktemp("stage1")
    data = shapes_dataset(root / "data")
    final = vlm_train.main(["--model_local_path", str(tiny), "--data_path", str(data["train"]), "--image_folder",
                            str(data["folder"]), "--output_dir", str(root / "out"), "--max_train_steps", "30",
                            "--learning_rate", "1e-2", "--train_batch_size", "4", "--lora_dropout", "0", "--seed",
                            "0"])
    return {"adapter": final, **data}


def test_pooling_takes_the_last_real_token_or_the_masked_mean():
    from library.vlm.head import pool

    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    last = torch.tensor([2, 4])
    assert torch.equal(pool(hidden, mask, last, "last"), torch.stack([hidden[0, 2], hidden[1, 4]]))
    assert torch.allclose(pool(hidden, mask, last, "mean"), torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0)]))


def test_head_learns_a_yes_no_rule_and_inference_loads_it(tiny, stage1, tmp_path):
    import vlm_infer
    import vlm_train_add_head

    data = yesno_dataset(tmp_path / "yesno")
    out = tmp_path / "head"
    final = vlm_train_add_head.main([
        "--model_local_path", str(tiny), "--stage1_path", str(stage1["adapter"]), "--data_path", str(data["train"]),
        "--eval_data_path", str(data["eval"]), "--image_folder", str(data["folder"]), "--output_dir", str(out),
        "--max_train_steps", "60", "--learning_rate", "1e-2", "--train_batch_size", "8", "--seed", "0"])
    for name in ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "head_config.json"):
        assert (final / name).is_file()
    assert json.loads((final / "head_config.json").read_text())["pooling"] == "last"
    results = tmp_path / "results.json"
    summary = vlm_infer.main(["--lora_path", str(final), "--data_path", str(data["eval"]), "--image_folder",
                              str(data["folder"]), "--output_file", str(results), "--batch_size", "5",
                              "--max_new_tokens", "3"])
    written = json.loads(results.read_text())
    assert written["count"] == 20 and written["head_accuracy"] == summary["head_accuracy"]
    assert written["head_accuracy"] >= 0.8, written["head_accuracy"]  # chance is 0.5
    first = written["results"][0]
    assert set(first) >= {"image", "question", "label", "prediction", "head_output", "head_prediction"}
    # batch size does not change the head's outputs (left padding, pooled at the last real token)
    single = tmp_path / "single.json"
    vlm_infer.main(["--lora_path", str(final), "--data_path", str(data["eval"]), "--image_folder",
                    str(data["folder"]), "--output_file", str(single), "--no_generate"])
    one = [r["head_output"] for r in json.loads(single.read_text())["results"]]
    assert one == pytest.approx([r["head_output"] for r in written["results"]], abs=1e-5)


def test_head_only_without_adapter_saves_the_projector_beside_the_head(tiny, tmp_path):
    import vlm_infer
    import vlm_train_add_head
    from safetensors.torch import load_file

    data = yesno_dataset(tmp_path / "yesno", n_train=8, n_eval=4)
    final = vlm_train_add_head.main([
        "--model_local_path", str(tiny), "--data_path", str(data["train"]), "--image_folder", str(data["folder"]),
        "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2", "--pooling", "mean", "--seed", "0"])
    tensors = load_file(str(final / "head.safetensors"))
    assert any(k.startswith("base.model.multi_modal_projector.") for k in tensors)
    assert not (final / "adapter_config.json").exists()
    summary = vlm_infer.main(["--lora_path", str(final), "--data_path", str(data["eval"]), "--image_folder",
                              str(data["folder"]), "--output_file", str(tmp_path / "r.json"), "--no_generate"])
    assert summary["head_accuracy"] is not None and summary["accuracy"] is None


def test_head_answers_must_be_yes_or_no(tiny, tmp_path):
    import vlm_train_add_head

    data = shapes_dataset(tmp_path / "shapes")
    with pytest.raises(UserError, match=r"train.json .*sample 1.*needs an answer starting with yes or no"):
        vlm_train_add_head.main(["--model_local_path", str(tiny), "--data_path", str(data["train"]), "--image_folder",
                                 str(data["folder"]), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1"])
    assert not (tmp_path / "out").exists()


def test_inference_json_has_labels_only_as_labels(tiny, stage1, tmp_path):
    import vlm_infer
    from library.vlm.data import DataOptions, load_conversations
    from library.vlm.inference import load_predictor

    draw("circle", "red", tmp_path / "a.png")
    draw("square", "blue", tmp_path / "b.png")
    data = tmp_path / "gold.json"
    data.write_text(json.dumps([conversation("a.png", "What is this?", "quokka-crimson-77"),
                                conversation("b.png", "What is this?", "a blue square")]), encoding="utf-8")
    predictor = load_predictor(None, str(stage1["adapter"]), torch.device("cpu"))
    samples = load_conversations(data, DataOptions(tmp_path))
    batch = predictor.prompt_batch(samples)
    prompts = predictor.vlm.tokenizer.batch_decode(batch["input_ids"])
    assert all("quokka" not in p and "blue square" not in p for p in prompts)
    assert all(p.endswith("<|im_start|>assistant\n") for p in prompts)

    out = tmp_path / "results.json"
    summary = vlm_infer.main(["--lora_path", str(stage1["adapter"]), "--data_path", str(data), "--image_folder",
                              str(tmp_path), "--output_file", str(out), "--max_new_tokens", "8", "--batch_size", "2"])
    results = json.loads(out.read_text())["results"]
    assert [r["label"] for r in results] == ["quokka-crimson-77", "a blue square"]
    assert all("quokka" not in r["prediction"] and "quokka" not in r["question"] for r in results)
    assert summary["accuracy"] == sum(r["correct"] for r in results) / 2
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        vlm_infer.main(["--lora_path", str(stage1["adapter"]), "--data_path", str(data), "--image_folder",
                        str(tmp_path), "--output_file", str(out)])


def test_inference_over_an_image_folder_with_a_prompt(tiny, stage1, tmp_path):
    import vlm_infer

    folder = stage1["folder"]
    out = tmp_path / "folder.json"
    summary = vlm_infer.main(["--base_model", str(tiny), "--lora_path", str(stage1["adapter"]), "--images",
                              str(folder), "--prompt", "What is this?", "--output_file", str(out),
                              "--max_new_tokens", "6", "--batch_size", "4"])
    assert summary["count"] == 12 and summary["accuracy"] is None
    assert all(r["label"] is None and r["prediction"] for r in summary["results"])
    # the adapter learned the captions of its training images: most answers are 'a <colour> <shape>'
    assert sum(r["prediction"].startswith("a ") for r in summary["results"]) >= 8
