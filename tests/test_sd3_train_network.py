"""sd3_train_network.py end to end on tiny SD3 / SD3.5 models: the single file (with and without the text
encoders inside), diffusers folders, every weighting scheme, text caching and dropout, metadata, learning,
bit-exact resume, and bad input refused before any model loads."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.models.sd3.tiny import TinySD3Config, save_tiny_sd3_diffusers, save_tiny_sd3_files
from family_helpers import (LoRAScript, assert_finite_loss_and_gradient, assert_fp8_lora_close,
                            assert_resume_is_bit_exact, post_hoc_ema, refusal_argv, trained, with_dataset)
from library.training.flow_matching import WEIGHTING_SCHEMES
from train_helpers import load_lora, train_args

SD3 = LoRAScript("sd3_train_network", "library.models.sd3.recipe:SD3LoRARecipe", "sd3")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return with_dataset(root, save_tiny_sd3_files(root / "m", TinySD3Config(variant="5-medium")))


def _argv(sd3, out, *, steps=2, model=None, extra=()):
    argv = train_args(model or sd3["sd3"], out, config=sd3["data"], steps=steps)
    return argv + ["--tokenizer_cache_dir", str(sd3["tokenizer_cache_dir"]), "--t5xxl_max_token_length", "8",
                   *extra]


def test_trains_an_sd3_lora_with_sd_scripts_names_and_metadata(sd3, tmp_path):
    out = SD3.main(_argv(sd3, tmp_path / "out", steps=3, extra=["--cache_latents"]))
    sd, meta = load_lora(out)
    names = {k.split(".")[0] for k in sd}
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn2_qkv"} <= names
    assert "lora_unet_joint_blocks_1_context_block_attn_proj" not in names  # the last context block is pre-only
    assert sum(n.startswith("lora_te1_text_model_") for n in names) == 12
    assert sum(n.startswith("lora_te2_text_model_") for n in names) == 12
    assert not any(n.startswith("lora_te3_") for n in names)
    assert sd["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (3 * 32, 4)
    assert trained(sd)
    assert meta["ss_base_model_version"] == "5-medium"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert meta["ss_network_module"] == "networks.lora_sd3"
    assert (meta["ss_weighting_scheme"], meta["ss_apply_t5_attn_mask"]) == ("uniform", "False")


def test_every_weighting_scheme_gives_a_finite_loss_and_gradient(sd3, tmp_path):
    from library.training.flow_matching import FlowMatchingSettings

    run = SD3.prepare(_argv(sd3, tmp_path / "out", extra=["--cache_latents", "--network_train_unet_only"]))
    assert (run.flow_settings.timestep_sampling, run.flow_settings.model_prediction_type) == ("sd3", "sigma_scaled")
    batch = next(iter(run.loader))
    for scheme in WEIGHTING_SCHEMES:
        for shift in (1.0, 3.0):
            settings = FlowMatchingSettings(timestep_sampling="sd3", model_prediction_type="sigma_scaled",
                                            weighting_scheme=scheme, training_shift=shift)
            assert_finite_loss_and_gradient(run, batch, settings, (scheme, shift))


def test_the_lora_learns_and_changes_the_output(sd3, tmp_path):
    from library.training.loop import batch_loss

    run = SD3.prepare(_argv(sd3, tmp_path / "out", extra=["--cache_latents", "--network_train_unet_only",
                                                          "--learning_rate", "2e-2", "--network_dim", "8"]))
    batch = next(iter(run.loader))
    fixed = torch.tensor([300.0, 700.0])

    def held_out() -> float:
        with torch.no_grad():
            return float(batch_loss(run, batch, 0, timesteps=fixed, generator=torch.Generator().manual_seed(3)))

    before = held_out()
    for step in range(25):
        loss = batch_loss(run, batch, step)
        loss.backward()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    after = held_out()
    assert after < 0.9 * before, (before, after)
    net, models = run.recipe.network, run.models
    latents = torch.randn(1, 16, 8, 8)
    cond = run.text(run.group.fixed_captions()[:1], torch.device("cpu"))  # the encoders are released: a cached caption
    with torch.no_grad():
        net.set_multiplier(1.0)
        on = models.family.spec.forward(models.unet, latents, torch.tensor([500.0]), cond, torch.float32)
        net.set_multiplier(0.0)
        off = models.family.spec.forward(models.unet, latents, torch.tensor([500.0]), cond, torch.float32)
    assert (on - off).abs().max() > 1e-4


def test_separate_parts_diffusers_folder_and_text_options(sd3, tmp_path):
    parts = save_tiny_sd3_files(tmp_path / "parts", TinySD3Config(variant="medium"), bundled=False)
    argv = _argv(sd3, tmp_path / "a", model=parts["sd3"], extra=[
        "--clip_l", str(parts["clip_l"]), "--clip_g", str(parts["clip_g"]), "--t5xxl", str(parts["t5xxl"]),
        "--vae", str(parts["vae"]), "--apply_lg_attn_mask", "--apply_t5_attn_mask", "--clip_l_dropout_rate", "0.5",
        "--t5_dropout_rate", "0.5", "--weighting_scheme", "logit_normal", "--training_shift", "3.0",
        "--cache_text_encoder_outputs", "--network_train_unet_only"])
    sd, meta = load_lora(SD3.main(argv))
    assert meta["ss_base_model_version"] == "medium" and meta["ss_apply_lg_attn_mask"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-medium/lora"
    assert not any(k.startswith("lora_te") for k in sd) and "lora_unet_joint_blocks_0_x_block_attn2_qkv.alpha" not in sd
    folder = save_tiny_sd3_diffusers(tmp_path / "folder", TinySD3Config(variant="5-large"))
    sd, meta = load_lora(SD3.main(train_args(folder, tmp_path / "b", config=sd3["data"], steps=2) + [
        "--t5xxl_max_token_length", "8", "--network_args", "train_t5xxl=True", "emb_dims=[2,2,2,2,2,2]"]))
    names = {k.split(".")[0] for k in sd}
    assert meta["ss_base_model_version"] == "5-large"
    assert any(n.startswith("lora_te3_encoder_block_0_layer_0_SelfAttention_q") for n in names)
    assert {"lora_unet_x_embedder_proj", "lora_unet_final_layer_adaLN_modulation_1"} <= names


@pytest.mark.parametrize("case, message", [
    ("flux", "this is a model of the FLUX family, which this script does not train; use flux_train_network.py"),
    ("sdxl", "this is a model of the SDXL family, which this script does not train; use sdxl_train_network.py"),
    ("t5_as_clip_g", "--clip_g .*t5xxl.safetensors: this file is a T5 text encoder, not a CLIP-G text encoder; "
                    "it belongs to --t5xxl"),
    ("medium_only", "--pos_emb_random_crop_rate is an SD3.5 Medium option, and this model is SD3 Medium"),
    ("swap", "--blocks_to_swap moves weights or activations between the GPU and host memory, and this machine has "
             "no CUDA device"),
    ("swap_limit", "--blocks_to_swap 8: this model has 2 joint blocks, and at most 0 of them can be swapped"),
    ("offload", "--cpu_offload_checkpointing moves weights or activations"),
    ("sd_flags", "--clip_skip does not apply to SD3"),
    ("flow", "--min_snr_gamma does not apply to flow-matching training"),
    ("timesteps", "--min_timestep 800 / --max_timestep 200"),
    ("network", "networks.lora finds no MMDiT layers"),
    ("network_args", "did you mean 'x_attn_dim'"),
    ("t5_cache", "train_t5xxl=True trains T5, whose outputs then cannot be cached"),
])
def test_bad_input_is_one_message_before_any_model_loads(sd3, tmp_path, case, message):
    from library.models.flux.tiny import save_tiny_flux_files
    from library.models.tiny_sdxl import save_tiny_sdxl_single_file

    parts = save_tiny_sd3_files(tmp_path / "parts", TinySD3Config(variant="medium"), bundled=False)
    argv = _argv(sd3, tmp_path / "out")
    with_parts = ["--clip_l", str(parts["clip_l"]), "--clip_g", str(parts["clip_g"]), "--t5xxl", str(parts["t5xxl"]),
                  "--vae", str(parts["vae"])]
    edits = {
        "flux": lambda a: a[:1] + [str(save_tiny_flux_files(tmp_path / "flux")["flux"])] + a[2:],
        "sdxl": lambda a: a[:1] + [str(save_tiny_sdxl_single_file(tmp_path / "sdxl.safetensors"))] + a[2:],
        "t5_as_clip_g": lambda a: a + ["--clip_g", str(parts["t5xxl"])],
        "medium_only": lambda a: a[:1] + [str(parts["sd3"])] + a[2:] + with_parts + ["--pos_emb_random_crop_rate",
                                                                                     "0.2"],
        "timesteps": lambda a: a + ["--min_timestep", "800", "--max_timestep", "200"],
        "network_args": lambda a: a + ["--network_args", "x_atn_dim=4"],
        "t5_cache": lambda a: a + ["--network_args", "train_t5xxl=True", "--cache_text_encoder_outputs",
                                   "--network_train_unet_only"],
    }
    with pytest.raises(UserError, match=message):
        SD3.main(refusal_argv(argv, case, edits))


def test_resume_is_bit_exact(sd3, tmp_path):
    extra = ["--cache_latents", "--save_every_n_steps", "2", "--save_state", "--network_dropout", "0.1",
             "--clip_g_dropout_rate", "0.3", "--weighting_scheme", "logit_normal", "--training_shift", "2.0"]
    weights = assert_resume_is_bit_exact(SD3.file, lambda out, more: _argv(sd3, out, steps=4, extra=more), tmp_path,
                                         extra)
    assert any(k.startswith("lora_te2_") for k in weights["lora.safetensors"])


def test_save_lora_format_diffusers(sd3, tmp_path):
    sd, meta = load_lora(SD3.main(_argv(sd3, tmp_path / "out", extra=["--save_lora_format", "diffusers"])))
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in sd
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in sd
    assert not any(k.startswith("lora_") for k in sd) and meta["ss_base_model_version"] == "5-medium"
    with pytest.raises(UserError, match="loads no T5 LoRA"):
        SD3.main(_argv(sd3, tmp_path / "o2", extra=["--save_lora_format", "diffusers", "--network_args",
                                                    "train_t5xxl=True"]))


def test_samples_during_training_with_the_flow_euler_sampler(sd3, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat --n blurry --w 80 --h 64 --d 7 --s 3 --l 4.0\nsks dog --d 8 --s 2 --l 1\n",
                       encoding="utf-8")
    SD3.main(_argv(sd3, tmp_path / "out", extra=["--sample_prompts", str(prompts), "--sample_every_n_steps", "1",
                                                 "--cache_latents"]))
    images = sorted((tmp_path / "out" / "sample").glob("*.png"))
    assert len(images) == 2 * 2  # two prompts after steps 1 and 2
    from PIL import Image

    first = Image.open(next(p for p in images if "_00_" in p.name))
    assert first.size == (80, 64)


def test_flow_euler_reaches_the_data_for_an_exact_velocity():
    from library.models.sd3.sampling import flow_euler

    x0 = torch.randn(1, 4, 4, 4)
    noise = torch.randn(1, 4, 4, 4)
    out = flow_euler(lambda x, t: noise - x0, noise, steps=5)
    assert torch.allclose(out, x0, atol=1e-5)


def test_plan_names_the_family_and_post_hoc_ema_of_sd3_loras(sd3, tmp_path, capsys):
    SD3.main(_argv(sd3, tmp_path / "out", steps=3, extra=["--cache_latents", "--network_train_unet_only",
                                                          "--save_every_n_steps", "1"]))
    assert "model family: sd3-5-medium" in capsys.readouterr().out
    meta = post_hoc_ema(tmp_path / "out", tmp_path / "ema.safetensors")
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"


def test_fp8_base_trains_a_lora_close_to_the_bf16_run(sd3, tmp_path):
    """--fp8_base on CPU: the MMDiT and the three frozen text encoders in float8, a LoRA that points the same way
    as the bf16 run's."""
    extra = ["--cache_latents", "--mixed_precision", "bf16", "--max_grad_norm", "0"]
    plain, _ = load_lora(SD3.main(_argv(sd3, tmp_path / "bf16", extra=extra)))
    fp8, meta = load_lora(SD3.main(_argv(sd3, tmp_path / "fp8", extra=extra + ["--fp8_base"])))
    assert any(k.startswith("lora_te2_") for k in fp8)  # CLIP LoRAs train on float8 layers too
    assert_fp8_lora_close(plain, fp8, meta)
