"""End-to-end LoRA runs on the tiny model: outputs, naming, metadata, options, samples, diffusers loading."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train_helpers import dataset_toml, dreambooth_dir, load_lora, make_images, run_main, train_args


# the ss_* keys sd-scripts' train_network.py writes in every file (sd-scripts.md section 3.4)
REFERENCE_KEYS = set("""ss_session_id ss_training_started_at ss_output_name ss_learning_rate ss_text_encoder_lr
ss_unet_lr ss_num_train_images ss_num_validation_images ss_num_reg_images ss_num_batches_per_epoch ss_num_epochs
ss_gradient_checkpointing ss_gradient_accumulation_steps ss_max_train_steps ss_lr_warmup_steps ss_lr_scheduler
ss_network_module ss_network_dim ss_network_alpha ss_network_dropout ss_mixed_precision ss_full_fp16 ss_v2
ss_base_model_version ss_clip_skip ss_max_token_length ss_cache_latents ss_seed ss_lowram ss_noise_offset
ss_multires_noise_iterations ss_multires_noise_discount ss_adaptive_noise_scale ss_zero_terminal_snr
ss_training_comment ss_sd_scripts_commit_hash ss_optimizer ss_max_grad_norm ss_caption_dropout_rate
ss_caption_dropout_every_n_epochs ss_caption_tag_dropout_rate ss_face_crop_aug_range ss_prior_loss_weight
ss_min_snr_gamma ss_scale_weight_norms ss_ip_noise_gamma ss_debiased_estimation ss_noise_offset_random_strength
ss_ip_noise_gamma_random_strength ss_loss_type ss_huber_schedule ss_huber_scale ss_huber_c ss_fp8_base
ss_fp8_base_unet ss_validation_seed ss_validation_split ss_max_validation_steps ss_validate_every_n_epochs
ss_validate_every_n_steps ss_resize_interpolation ss_network_args ss_sd_model_name""".split())


@pytest.fixture
def data(tmp_path):
    return dataset_toml(tmp_path / "data.toml", make_images(tmp_path / "images", count=2))


def test_unet_only_run_writes_named_files_with_metadata(tiny_sd1_dir, data, tmp_path):
    out = tmp_path / "out"
    final = run_main(train_args(tiny_sd1_dir, out, config=data, steps=4, name="mylora",
                                extra=["--network_train_unet_only", "--save_every_n_steps", "2",
                                       "--scale_weight_norms", "1",
                                       "--save_every_n_epochs", "1", "--training_comment", "hello"]))
    assert final == out / "mylora.safetensors"
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    # 2 images, batch 2 -> 1 step per epoch: epoch files 1..3 (not the last epoch), step file 2 (not the last step)
    assert names == ["mylora-000001.safetensors", "mylora-000002.safetensors", "mylora-000003.safetensors",
                     "mylora-step00000002.safetensors", "mylora.safetensors"]
    tensors, meta = load_lora(final)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert any(k.endswith(".alpha") for k in tensors)
    assert not REFERENCE_KEYS - set(meta)
    for key in ("ss_datasets", "ss_tag_frequency", "ss_dataset_dirs", "ss_steps", "ss_epoch",
                "ss_training_finished_at", "sshs_model_hash", "sshs_legacy_hash", "modelspec.architecture",
                "modelspec.title", "modelspec.date"):
        assert key in meta, key
    assert meta["ss_optimizer"].startswith("torch.optim.adamw.AdamW") and meta["ss_scale_weight_norms"] == "1.0"
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
                                extra=["--network_args", "conv_dim=2", "conv_alpha=1",
                                       "--gradient_checkpointing", "--gradient_accumulation_steps", "2",
                                       "--clip_skip", "2", "--max_token_length", "150", "--weighted_captions",
                                       "--max_train_epochs", "1", "--mixed_precision", "bf16"]))
    tensors, meta = load_lora(final)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in tensors)
    assert any("resnets" in k and k.endswith("lora_down.weight") and tensors[k].dim() == 4
               and tensors[k].shape[-1] == 3 for k in tensors)
    assert not REFERENCE_KEYS - set(meta) and "ss_datasets" not in meta  # old-style dataset options
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_sks thing": {"n_repeats": 2, "img_count": 2}}
    assert meta["ss_batch_size_per_device"] == "2" and meta["ss_total_batch_size"] == "4"
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.encoder_layer"] == "2"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    # max_train_epochs wins: 2 images x 2 repeats, batch 2, accumulation 2 -> 1 step per epoch
    assert all(v.dtype == torch.float32 for v in tensors.values())
    up = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert any(float(v.abs().max()) > 0 for v in up)  # trained through checkpointing and accumulation


def test_debug_dataset_shows_batches_and_trains_nothing(tiny_sd1_dir, data, tmp_path, capsys):
    assert run_main(train_args(tiny_sd1_dir, tmp_path / "out", config=data, extra=["--debug_dataset"])) is None
    shown = capsys.readouterr().out
    assert "caption: 'sks, a photo 0'" in shown or "caption: 'sks, a photo 1'" in shown
    assert not (tmp_path / "out").exists()


def test_debug_dataset_with_a_token_warmup_ratio_shows_the_run_totals(tiny_sd1_dir, tmp_path, capsys):
    data = dreambooth_dir(tmp_path / "train", count=2, repeats=2)
    argv = train_args(tiny_sd1_dir, tmp_path / "out", data=data, steps=6,
                      extra=["--debug_dataset", "--shuffle_caption", "--token_warmup_step", "0.5"])
    assert run_main(argv) is None
    shown = capsys.readouterr().out
    assert "6 optimizer steps" in shown or "6 steps" in shown
    assert "caption:" in shown


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
    run_main(["--config_file", str(cfg), "--overwrite", "--seed", "4", "--no_metadata"])
    assert final.read_bytes() != before
    meta = load_lora(final)[1]
    assert {k for k in meta if k.startswith("ss_")} == {"ss_v2", "ss_base_model_version", "ss_network_module",
                                                          "ss_network_dim", "ss_network_alpha", "ss_network_args"}
    assert "modelspec.architecture" in meta


@pytest.mark.parametrize("extra, message", [
    (["--cache_text_encoder_outputs"], "frozen text encoder"),
    (["--cache_text_encoder_outputs", "--network_train_unet_only", "--shuffle_caption"], "shuffle_caption"),
    (["--mixed_precision", "fp16"], "CUDA"),
    (["--cache_latents", "--random_crop"], "random_crop"),
    (["--full_bf16"], "--full_bf16 requires"),
    (["--network_train_unet_only", "--network_train_text_encoder_only"], "exclude each other"),
    (["--masked_loss"], "no subset has masks"),
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


def test_samples_logs_validation_and_diffusers_loading(tiny_sd1_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    data = dataset_toml(tmp_path / "data.toml", make_images(tmp_path / "images", count=4),
                        extra_general="validation_split = 0.5\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks, a photo --w 64 --h 64 --s 2 --d 5\n", encoding="utf-8")
    out = tmp_path / "out"
    final = run_main(train_args(tiny_sd1_dir, out, config=data, steps=2,
                                extra=["--sample_prompts", str(prompts), "--sample_every_n_steps", "1",
                                       "--sample_at_first", "--logging_dir", str(tmp_path / "logs"),
                                       "--log_prefix", "run_", "--validate_every_n_steps", "1"]))
    samples = sorted((out / "sample").glob("*.png"))
    assert len(samples) >= 3  # at first, step 1, end
    events = list((tmp_path / "logs").glob("run_*/**/events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/current", "loss/average", "lr/unet", "lr/textencoder", "loss/epoch",
            "loss/validation/current"} <= tags
    validation = [e.value for e in acc.Scalars("loss/validation/current")]
    assert len(validation) == 1 and validation[0] > 0  # step 1 (step 2 is the last step)

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1_dir), safety_checker=None)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    before = layer.weight.clone()
    pipe.load_lora_weights(str(final))
    pipe.fuse_lora()
    assert not torch.equal(before, layer.weight)


def test_sigterm_saves_a_resumable_state(tiny_sd1_dir, data, tmp_path):
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from library.training.state import verify_state
    from tests.train_helpers import ROOT

    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_network.py"),
                             *train_args(tiny_sd1_dir, out, config=data, steps=100000,
                                         extra=["--save_state", "--save_every_n_steps", "3"])],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "lora-step00000003-state").is_dir() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stdout[-2000:]
    saved = re.search(r"interrupted: state of step (\d+) saved to (\S+);", stdout)
    assert saved, stdout[-2000:]
    info = verify_state(saved.group(2))
    assert info["global_step"] == int(saved.group(1)) >= 3 and not list(out.glob(".*partial"))


def test_continue_from_network_weights_and_merge_base_weights(tiny_sd1_dir, data, tmp_path):
    first = run_main(train_args(tiny_sd1_dir, tmp_path / "a", config=data, steps=2, extra=["--network_dim", "2"]))
    start, _ = load_lora(first)
    second = run_main(train_args(tiny_sd1_dir, tmp_path / "b", config=data, steps=1,
                                 extra=["--network_weights", str(first), "--dim_from_weights",
                                        "--base_weights", str(first), "--learning_rate", "1e-9",
                                        "--max_grad_norm", "0"]))
    tensors, meta = load_lora(second)
    assert tensors.keys() == start.keys() and tensors[next(iter(tensors))].shape == start[next(iter(start))].shape
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    torch.testing.assert_close(tensors[key], start[key], rtol=1e-4, atol=1e-6)  # started from the file


def test_epoch_ratio_and_pruning_of_old_saves(tiny_sd1_dir, data, tmp_path):
    out = tmp_path / "out"
    run_main(train_args(tiny_sd1_dir, out, config=data, steps=5,
                        extra=["--network_train_unet_only", "--save_n_epoch_ratio", "2", "--save_every_n_steps", "1",
                               "--save_last_n_steps", "2", "--save_state", "--save_last_n_steps_state", "1"]))
    # 5 epochs of 1 step: ratio 2 -> every 2 epochs; step files of the last 2 steps before the end; 1 step state
    assert {p.name for p in out.iterdir()} == {
        "lora-000002.safetensors", "lora-000002-state", "lora-000004.safetensors", "lora-000004-state",
        "lora-state", "lora-step00000003.safetensors", "lora-step00000004-state", "lora-step00000004.safetensors",
        "lora.safetensors"}


def test_all_problems_are_reported_at_once(tmp_path):
    from library.errors import UserError

    with pytest.raises(UserError) as info:
        run_main(train_args(tmp_path / "no_model", tmp_path / "out", data=tmp_path / "no_data",
                            extra=["--mixed_precision", "fp16", "--adaptive_noise_scale", "0.1",
                                   "--optimizer_type", "NoSuchOptimizer"]))
    message = info.value.message
    for part in ("fp16", "--adaptive_noise_scale", "NoSuchOptimizer", "no_model", "no_data"):
        assert part in message, (part, message)


def test_text_encoder_only_trains_through_the_frozen_unet(tiny_sd1_dir, data, tmp_path):
    final = run_main(train_args(tiny_sd1_dir, tmp_path / "out", config=data, steps=2,
                                extra=["--network_train_text_encoder_only", "--gradient_checkpointing"]))
    tensors, _ = load_lora(final)
    assert tensors and all(k.startswith("lora_te_") for k in tensors)
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))


def test_dataset_network_multiplier_is_applied(tiny_sd1_dir, tmp_path):
    # sd-scripts reads network_multiplier from the dataset config but never applies it; here 0 switches the LoRA
    # off for that dataset's batches, so nothing reaches lora_up (which starts at zero)
    data = dataset_toml(tmp_path / "data.toml", make_images(tmp_path / "images", count=2),
                        extra_general="network_multiplier = 0.0\n")
    tensors, _ = load_lora(run_main(train_args(tiny_sd1_dir, tmp_path / "out", config=data, steps=2)))
    assert all(float(v.abs().max()) == 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))


def test_full_bf16_weights_and_save_precision(tiny_sd1_dir, data, tmp_path):
    final = run_main(train_args(tiny_sd1_dir, tmp_path / "out", config=data, steps=2,
                                extra=["--mixed_precision", "bf16", "--full_bf16", "--save_precision", "fp16",
                                       "--save_every_n_steps", "1", "--save_model_as", "safetensors"]))
    tensors, meta = load_lora(final)
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    assert meta["ss_mixed_precision"] == "bf16"


def test_sd2_v_single_file_lora_is_a_standard_sd2_file(tiny_sd2_dir, data, tmp_path):
    """SD2 768-v from a single .safetensors: the LoRA file names the SD2 text encoder layers the standard way, its
    metadata says v2 / v-prediction, and diffusers applies it."""
    import argparse

    from diffusers import StableDiffusionPipeline

    from library.models.loading import load_sd_models
    from library.models.saving import save_sd_model

    base = load_sd_models(argparse.Namespace(pretrained_model_name_or_path=str(tiny_sd2_dir), v2=True))
    single = save_sd_model(tmp_path / "sd2-v.safetensors", base, fmt="safetensors")
    final = run_main(train_args(single, tmp_path / "out", config=data, steps=2, name="sd2lora", extra=[
        "--v2", "--v_parameterization", "--tokenizer_cache_dir", str(tiny_sd2_dir), "--clip_skip", "2",
        "--unet_lr", "1e-3", "--text_encoder_lr", "5e-4"]))
    tensors, meta = load_lora(final)
    te_modules = {k.split(".")[0] for k in tensors if k.startswith("lora_te_")}
    assert te_modules == {f"lora_te_text_model_encoder_layers_{i}_{m}" for i in (0, 1) for m in
                          ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                           "mlp_fc1", "mlp_fc2")}
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32)  # linear
    assert (meta["ss_v2"], meta["ss_base_model_version"], meta["ss_clip_skip"]) == ("True", "sd_v2_v", "2")
    assert meta["ss_sd_model_name"] == "sd2-v.safetensors" and len(meta["ss_new_sd_model_hash"]) == 64
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert (meta["modelspec.prediction_type"], meta["modelspec.encoder_layer"]) == ("v", "2")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd2_dir), safety_checker=None, local_files_only=True)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = pipe.unet(x, t, ctx).sample
        pipe.load_lora_weights(str(final))
        after = pipe.unet(x, t, ctx).sample
    assert not torch.equal(before, after)  # the trained LoRA is applied (its up weights left zero)


def test_schedule_free_optimizer_trains_and_saves(tiny_sd1_dir, data, tmp_path):
    final = run_main(train_args(tiny_sd1_dir, tmp_path / "out", config=data, steps=2,
                                extra=["--optimizer_type", "AdamWScheduleFree", "--save_every_n_steps", "1"]))
    tensors, meta = load_lora(final)
    assert "schedulefree" in meta["ss_optimizer"]
    assert (tmp_path / "out" / "lora-step00000001.safetensors").exists()
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in tensors.items())


def test_last_epoch_ends_like_the_others(tiny_sd1_dir, data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks --w 64 --h 64 --s 1\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = train_args(tiny_sd1_dir, out, config=data, steps=100,
                      extra=["--max_train_epochs", "2", "--sample_prompts", str(prompts), "--sample_every_n_epochs",
                             "1", "--logging_dir", str(tmp_path / "logs"), "--save_state"])
    final = run_main(argv)
    _, meta = load_lora(final)
    assert meta["ss_epoch"] == "2" and meta["ss_steps"] == "2"
    tags = sorted(p.name.split("_")[1] for p in (out / "sample").glob("*.png"))
    assert tags == ["e000001", "e000002"]
    acc = EventAccumulator(str(next((tmp_path / "logs").glob("**/events.out.tfevents.*")).parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/epoch")] == [1, 2]
    from library.training.state import verify_state

    assert verify_state(out / "lora-state")["epoch"] == 2
