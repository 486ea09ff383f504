"""flux_train_network.py end to end on the tiny FLUX model: every sampling and prediction type, text caching,
diffusers folders, schnell, metadata, bit-exact resume, and bad input refused before any model loads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.models.flux.tiny import TinyFluxConfig, save_tiny_flux_diffusers, save_tiny_flux_files
from family_helpers import (LoRAScript, assert_finite_loss_and_gradient, assert_fp8_lora_close,
                            assert_resume_is_bit_exact, forbid_loading, post_hoc_ema, refusal_argv, run_two_processes,
                            trained, two_process_dataset, with_dataset)
from library.training.flow_matching import MODEL_PREDICTION_TYPES, TIMESTEP_SAMPLINGS, FlowMatchingSettings
from train_helpers import load_lora, train_args

FLUX = LoRAScript("flux_train_network", "library.models.flux.recipe:FluxLoRARecipe", "flux")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return with_dataset(root, save_tiny_flux_files(root / "dev", seed=0))


def _argv(flux, out, *, steps=2, model=None, extra=(), config=None):
    argv = train_args(model or flux["flux"], out, config=config or flux["data"], steps=steps)
    argv += ["--tokenizer_cache_dir", str(flux["tokenizer_cache_dir"]), "--t5xxl_max_token_length", "16"]
    if model is None:
        argv += ["--clip_l", str(flux["clip_l"]), "--t5xxl", str(flux["t5xxl"]), "--ae", str(flux["ae"])]
    return argv + list(extra)


def test_trains_a_flux_lora_with_sd_scripts_names_and_metadata(flux, tmp_path):
    out = FLUX.main(_argv(flux, tmp_path / "out", steps=3, extra=["--cache_latents"]))
    sd, meta = load_lora(out)
    names = {k.split(".")[0] for k in sd}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names and "lora_unet_single_blocks_1_linear1" in names
    assert sum(n.startswith("lora_te1_text_model_") for n in names) == 12 and len(names) == 26 + 12
    assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (4 * 64 + 3 * 64, 4)
    assert trained(sd)
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert (meta["ss_guidance_scale"], meta["ss_timestep_sampling"], meta["ss_model_prediction_type"]) == (
        "3.5", "sigma", "raw")


def test_every_sampling_and_prediction_type_gives_a_finite_loss_and_gradient(flux, tmp_path):
    run = FLUX.prepare(_argv(flux, tmp_path / "out", extra=["--cache_latents", "--network_train_unet_only"]))
    batch = next(iter(run.loader))
    combos = [(s, "raw") for s in TIMESTEP_SAMPLINGS] + [("sigma", p) for p in MODEL_PREDICTION_TYPES[1:]]
    combos.append(("sigma", "sigma_scaled"))
    for sampling, prediction in combos:
        weighting = "sigma_sqrt" if prediction == "sigma_scaled" else "uniform"
        settings = FlowMatchingSettings(timestep_sampling=sampling, model_prediction_type=prediction,
                                        weighting_scheme=weighting)
        assert_finite_loss_and_gradient(run, batch, settings, (sampling, prediction))


def test_cached_and_uncached_text_give_the_same_first_loss(flux, tmp_path):
    from library.training.loop import batch_loss

    losses = []
    for i, extra in enumerate(([], ["--cache_text_encoder_outputs_to_disk", "--apply_t5_attn_mask"],
                               ["--apply_t5_attn_mask"])):
        run = FLUX.prepare(_argv(flux, tmp_path / f"o{i}", extra=["--network_train_unet_only", *extra]))
        if i == 1:
            assert run.text.cache and run.text.cache_dir is not None
        batch = next(iter(run.loader))
        with torch.no_grad():
            losses.append(float(batch_loss(run, batch, 0)))
            if i == 1:  # a second pass reads the disk cache
                assert float(batch_loss(run, batch, 0)) != losses[-1]  # other noise, same text
    assert losses[1] == pytest.approx(losses[2], rel=1e-6)
    assert losses[0] != pytest.approx(losses[1], rel=1e-6)  # the T5 mask changes the conditioning
    assert list((tmp_path / "o1" / ".cache" / "text_encoder_outputs").glob("*.safetensors"))


def test_diffusers_folder_and_schnell(tmp_path, flux):
    folder = save_tiny_flux_diffusers(tmp_path / "schnell", TinyFluxConfig(guidance=False), seed=1)
    argv = train_args(folder, tmp_path / "out", config=flux["data"], steps=2)
    out = FLUX.main(argv + ["--t5xxl_max_token_length", "8", "--network_train_unet_only"])
    sd, meta = load_lora(out)
    assert meta["modelspec.architecture"] == "flux-1-schnell/lora" and meta["ss_guidance_scale"] == "1.0"
    assert all(k.startswith("lora_unet_") for k in sd)
    with pytest.raises(UserError, match="schnell has no guidance embedding"):
        FLUX.main(argv + ["--guidance_scale", "3.5"])


def _sdxl_like_file(path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8)}, str(path))
    return path


@pytest.mark.parametrize("case, message", [
    ("sdxl", "this is a model of the SDXL family, which this script does not train; use sdxl_train_network.py"),
    ("t5_as_clip", "--clip_l .*t5xxl.safetensors: this file is a T5 text encoder, not a CLIP text encoder"),
    ("no_ae", "--ae is missing"),
    ("offload", "--cpu_offload_checkpointing moves weights or activations between the GPU and host memory, and "
                "this machine has no CUDA device"),
    ("swap", "--blocks_to_swap needs --gradient_checkpointing"),
    ("sd_flags", "--clip_skip does not apply to FLUX.1"),
    ("flow", "--min_snr_gamma does not apply to flow-matching training"),
    ("network", "use --network_module networks.lora_flux"),
    ("network_args", "did you mean 'img_attn_dim'"),
])
def test_bad_input_is_one_message_before_any_model_loads(flux, tmp_path, monkeypatch, case, message):
    import library.models.flux.loading as loading

    forbid_loading(monkeypatch, loading, "load_flux_models")
    edits = {
        "sdxl": lambda a: a[:1] + [str(_sdxl_like_file(tmp_path / "sdxl.safetensors"))] + a[2:],
        "t5_as_clip": lambda a: [flux["t5xxl"].as_posix() if x == str(flux["clip_l"]) else x for x in a],
        "network_args": lambda a: a + ["--network_args", "img_atn_dim=4"],
    }
    with pytest.raises(UserError, match=message):
        FLUX.main(refusal_argv(_argv(flux, tmp_path / "out"), case, edits))


def test_resume_is_bit_exact(flux, tmp_path):
    extra = ["--cache_latents", "--network_train_unet_only", "--save_every_n_steps", "2", "--save_state",
             "--network_dropout", "0.1", "--noise_offset", "0.05", "--timestep_sampling", "shift"]
    assert_resume_is_bit_exact(FLUX.file, lambda out, more: _argv(flux, out, steps=4, extra=more), tmp_path, extra)


def test_two_processes(flux, tmp_path):
    argv = _argv(flux, tmp_path / "out", config=two_process_dataset(tmp_path), extra=["--cache_latents"])
    sd, _ = run_two_processes(argv, FLUX.file, tmp_path / "out")
    assert len(sd) == 3 * (26 + 12) and trained(sd)


def test_post_hoc_ema_of_flux_loras(flux, tmp_path):
    FLUX.main(_argv(flux, tmp_path / "out", steps=3, extra=["--cache_latents", "--network_train_unet_only",
                                                            "--save_every_n_steps", "1"]))
    meta = post_hoc_ema(tmp_path / "out", tmp_path / "ema.safetensors")
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"


def test_samples_are_written_and_deterministic_for_a_seed(flux, tmp_path):
    import numpy as np
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 88 --h 64 --d 7 --s 3 --g 2.0\n"
                       "a blue circle --n blurry --l 2.0 --d 8 --s 2\n", encoding="utf-8")
    extra = ["--cache_latents", "--network_train_unet_only", "--sample_prompts", str(prompts), "--sample_at_first",
             "--sample_every_n_steps", "1"]
    images = []
    for name in ("a", "b"):
        FLUX.main(_argv(flux, tmp_path / name, steps=1, extra=extra))
        files = sorted((tmp_path / name / "sample").glob("*.png"))
        assert [f.name.split("_")[1:3] for f in files] == [["000000", "00"], ["000000", "01"], ["000001", "00"],
                                                           ["000001", "01"]]
        images.append([np.asarray(Image.open(f)) for f in files])
    assert images[0][0].shape == (64, 80, 3) and images[0][1].shape == (64, 64, 3)
    assert all(np.array_equal(a, b) for a, b in zip(*images))
    assert not np.array_equal(images[0][0], images[0][2])  # the LoRA trained between the two samples


def test_fp8_base_trains_a_lora_close_to_the_bf16_run(flux, tmp_path):
    extra = ["--cache_latents", "--network_train_unet_only", "--mixed_precision", "bf16", "--max_grad_norm", "0"]
    plain, _ = load_lora(FLUX.main(_argv(flux, tmp_path / "bf16", steps=2, extra=extra)))
    fp8, meta = load_lora(FLUX.main(_argv(flux, tmp_path / "fp8", steps=2, extra=extra + ["--fp8_base"])))
    assert_fp8_lora_close(plain, fp8, meta)


def test_t5_and_clip_loras_train_end_to_end_with_split_qkv_and_regex_ranks(flux, tmp_path):
    extra = ["--cache_latents", "--network_args", "train_t5xxl=True", "split_qkv=True",
             "network_reg_dims=single_blocks_\\d+_linear1=2", "--text_encoder_lr", "1e-3", "5e-4"]
    sd, meta = load_lora(FLUX.main(_argv(flux, tmp_path / "out", steps=2, extra=extra)))
    assert sd["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (4 * 2, 64)  # q, k, v, mlp at rank 2
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (3 * 4, 64)
    t5 = {k.split(".")[0] for k in sd if k.startswith("lora_te3_")}
    clip = {k.split(".")[0] for k in sd if k.startswith("lora_te1_text_model_")}
    assert len(t5) == 2 * 7 and len(clip) == 12
    for names in (t5, clip):
        assert any(sd[f"{n}.lora_up.weight"].abs().sum() > 0 for n in names)  # both encoders' LoRAs trained
    assert "train_t5xxl" in meta["ss_network_args"]
