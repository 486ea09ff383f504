"""End-to-end LoRA runs on the tiny model: outputs, naming, metadata, options, samples, diffusers loading."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train_helpers import dataset_toml, dreambooth_dir, load_lora, make_images, run_main, train_args


@pytest.fixture
def data(tmp_path):
    return dataset_toml(tmp_path / "data.toml", make_images(tmp_path / "images", count=2))


def test_unet_only_run_writes_named_files_with_metadata(tiny_sd1_dir, data, tmp_path):
    out = tmp_path / "out"
    final = run_main(train_args(tiny_sd1_dir, out, config=data, steps=4, name="mylora",
                                extra=["--network_train_unet_only", "--save_every_n_steps", "2",
                                       "--save_every_n_epochs", "1", "--training_comment", "hello"]))
    assert final == out / "mylora.safetensors"
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    # 2 images, batch 2 -> 1 step per epoch: epoch files 1..3 (not the last epoch), step file 2 (not the last step)
    assert names == ["mylora-000001.safetensors", "mylora-000002.safetensors", "mylora-000003.safetensors",
                     "mylora-step00000002.safetensors", "mylora.safetensors"]
    tensors, meta = load_lora(final)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert any(k.endswith(".alpha") for k in tensors)
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_learning_rate", "ss_num_epochs",
                "ss_max_train_steps", "ss_seed", "ss_optimizer", "ss_datasets", "ss_tag_frequency", "ss_steps",
                "ss_epoch", "ss_base_model_version", "ss_v2", "sshs_model_hash", "sshs_legacy_hash",
                "modelspec.architecture", "modelspec.title"):
        assert key in meta, key
    assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "4" and meta["ss_training_comment"] == "hello"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    datasets = json.loads(meta["ss_datasets"])
    assert datasets[0]["num_train_images"] == 2 and datasets[0]["subsets"][0]["img_count"] == 2
    assert json.loads(meta["ss_tag_frequency"])["images"]["sks"] == 2
    _, step_meta = load_lora(out / "mylora-step00000002.safetensors")
    assert step_meta["ss_steps"] == "2"


def test_text_encoder_and_locon_with_old_style_folders(tiny_sd1_dir, tmp_path):
    data = dreambooth_dir(tmp_path / "train", count=2, repeats=2)
    final = run_main(train_args(tiny_sd1_dir, tmp_path / "out", data=data, steps=2,
                                extra=["--network_args", "conv_dim=2", "conv_alpha=1", "--no_metadata"]))
    tensors, meta = load_lora(final)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in tensors)
    assert any("resnets" in k and k.endswith("lora_down.weight") and tensors[k].dim() == 4
               and tensors[k].shape[-1] == 3 for k in tensors)
    assert "ss_datasets" not in meta and meta["ss_network_module"] == "networks.lora"
    assert "ss_train_data_dir" not in meta


def test_config_file_and_refusal_to_overwrite(tiny_sd1_dir, data, tmp_path):
    from library.errors import UserError

    out = tmp_path / "out"
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"[model]\npretrained_model_name_or_path = '{tiny_sd1_dir.as_posix()}'\n"
                   f"[train]\nmax_train_steps = 1\nnetwork_dim = 2\nseed = 3\nmax_data_loader_n_workers = 0\n"
                   f"output_dir = '{out.as_posix()}'\ndataset_config = '{data.as_posix()}'\n", encoding="utf-8")
    final = run_main(["--config_file", str(cfg)])
    assert final == out / "last.safetensors"
    assert load_lora(final)[1]["ss_network_dim"] == "2"
    before = final.read_bytes()
    with pytest.raises(UserError, match="already has files"):
        run_main(["--config_file", str(cfg)])
    assert final.read_bytes() == before
    run_main(["--config_file", str(cfg), "--overwrite", "--seed", "4"])
    assert final.read_bytes() != before


@pytest.mark.parametrize("extra, message", [
    (["--cache_text_encoder_outputs"], "frozen text encoder"),
    (["--cache_text_encoder_outputs", "--network_train_unet_only", "--shuffle_caption"], "shuffle_caption"),
    (["--mixed_precision", "fp16"], "CUDA"),
    (["--cache_latents", "--random_crop"], "random_crop"),
    (["--full_bf16"], "--full_bf16 requires"),
    (["--network_train_unet_only", "--network_train_text_encoder_only"], "exclude each other"),
])
def test_bad_combinations_fail_before_any_model_loads(tmp_path, extra, message):
    from library.errors import UserError

    data = dreambooth_dir(tmp_path / "train")
    missing_model = tmp_path / "no_model_here"
    with pytest.raises(UserError, match=message):
        run_main(train_args(missing_model, tmp_path / "out", data=data, extra=extra))


def test_xformers_missing_gives_a_clear_message(tmp_path):
    from library.errors import UserError

    try:
        import xformers  # noqa: F401
        pytest.skip("xformers is installed")
    except ImportError:
        pass
    with pytest.raises(UserError, match="xformers package is not installed"):
        run_main(train_args(tmp_path / "m", tmp_path / "out", data=dreambooth_dir(tmp_path / "t"),
                            extra=["--xformers"]))


def test_nan_loss_stops_with_the_step(tiny_sd1_dir, data, tmp_path):
    from library.errors import UserError

    with pytest.raises(UserError, match=r"loss became nan at step 2"):
        run_main(train_args(tiny_sd1_dir, tmp_path / "out", config=data, steps=4,
                            extra=["--learning_rate", "1e30", "--optimizer_type", "SGDNesterov",
                                   "--max_grad_norm", "0"]))


def test_samples_logs_and_diffusers_loading(tiny_sd1_dir, data, tmp_path):
    from diffusers import StableDiffusionPipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks, a photo --w 64 --h 64 --s 2 --d 5\n", encoding="utf-8")
    out = tmp_path / "out"
    final = run_main(train_args(tiny_sd1_dir, out, config=data, steps=2,
                                extra=["--sample_prompts", str(prompts), "--sample_every_n_steps", "1",
                                       "--sample_at_first", "--logging_dir", str(tmp_path / "logs"),
                                       "--log_prefix", "run_"]))
    samples = sorted((out / "sample").glob("*.png"))
    assert len(samples) >= 3  # at first, step 1, end
    events = list((tmp_path / "logs").glob("run_*/**/events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/current", "loss/average", "lr/unet", "lr/textencoder", "loss/epoch"} <= tags

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1_dir), safety_checker=None)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    before = layer.weight.clone()
    pipe.load_lora_weights(str(final))
    pipe.fuse_lora()
    assert not torch.equal(before, layer.weight)
