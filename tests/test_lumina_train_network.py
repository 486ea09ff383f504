"""lumina_train_network.py end to end on the tiny Lumina 2 model: sd-scripts' names and metadata, learning, every
timestep sampling, text outputs cached by content and system prompt, diffusers folders, --use_flash_attn, bit-exact
resume, diffusers' Lumina2Pipeline applying the converted LoRA, and bad input refused before any model loads."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.models.lumina.tiny import save_tiny_lumina_diffusers, save_tiny_lumina_files
from family_helpers import (LoRAScript, assert_finite_loss_and_gradient, assert_fp8_lora_close,
                            assert_resume_is_bit_exact, forbid_loading, post_hoc_ema, refusal_argv, run_two_processes,
                            trained, two_process_dataset, with_dataset)
from library.training.flow_matching import MODEL_PREDICTION_TYPES, TIMESTEP_SAMPLINGS, FlowMatchingSettings
from train_helpers import ROOT, load_lora, train_args

SYSTEM = "You are an assistant."
LUMINA = LoRAScript("lumina_train_network", "library.models.lumina.recipe:LuminaLoRARecipe", "lumina")


@pytest.fixture(scope="module")
def lumina(tmp_path_factory):
    root = tmp_path_factory.mktemp("lumina")
    return with_dataset(root, save_tiny_lumina_files(root / "model", seed=0))


def _argv(lumina, out, *, steps=2, model=None, extra=(), config=None):
    argv = train_args(model or lumina["lumina"], out, config=config or lumina["data"], steps=steps)
    argv += ["--tokenizer_cache_dir", str(lumina["tokenizer_cache_dir"]), "--gemma2_max_token_length", "16",
             "--system_prompt", SYSTEM]
    if model is None:
        argv += ["--gemma2", str(lumina["gemma2"]), "--ae", str(lumina["ae"])]
    return argv + list(extra)


def test_trains_a_lumina_lora_with_sd_scripts_names_and_metadata(lumina, tmp_path):
    out = LUMINA.main(_argv(lumina, tmp_path / "out", steps=3, extra=["--cache_latents"]))
    sd, meta = load_lora(out)
    names = {k.split(".")[0] for k in sd}
    assert {"lora_unet_layers_0_attention_qkv", "lora_unet_context_refiner_0_feed_forward_w2",
            "lora_unet_noise_refiner_0_adaLN_modulation_1", "lora_unet_final_layer_linear",
            "lora_te_layers_1_self_attn_q_proj", "lora_te_layers_0_mlp_down_proj"} <= names
    assert len(names) == 2 * 7 + 2 * 6 + 6 + 5 + 2 and "lora_unet_context_refiner_0_adaLN_modulation_1" not in names
    assert sd["lora_unet_layers_0_attention_qkv.lora_up.weight"].shape == (48 + 2 * 24, 4)
    assert trained(sd)
    assert meta["ss_base_model_version"] == "lumina2" and meta["modelspec.architecture"] == "lumina-2/lora"
    assert meta["ss_network_module"] == "networks.lora_lumina"
    assert (meta["ss_timestep_sampling"], meta["ss_discrete_flow_shift"], meta["ss_model_prediction_type"]) == (
        "shift", "6.0", "raw")


def _fixed_loss(run, batches) -> float:
    from library.training.loop import batch_loss

    total = 0.0
    with torch.no_grad():
        for batch in batches:
            g = torch.Generator().manual_seed(5)
            total += float(batch_loss(run, batch, 0, timesteps=torch.tensor([250.0, 750.0]), generator=g))
    return total


def test_loss_drops_and_the_lora_changes_the_output(lumina, tmp_path):
    from library.training.loop import train

    argv = _argv(lumina, tmp_path / "out", steps=12, extra=["--cache_latents", "--network_train_unet_only",
                                                           "--learning_rate", "1e-2", "--network_alpha", "4"])
    run = LUMINA.prepare(argv)
    batches = list(run.loader)
    before = _fixed_loss(run, batches)
    train(run)
    run.recipe.network.train(False)
    after = _fixed_loss(run, batches)
    with torch.no_grad():  # multipliers come from the dataset; zero up-projections remove the LoRA
        for lora in run.recipe.network.all_loras():
            lora.lora_up.weight.zero_()
    without = _fixed_loss(run, batches)
    assert after < 0.9 * before and without == pytest.approx(before, rel=1e-5)


def test_every_sampling_and_prediction_type_gives_a_finite_loss_and_gradient(lumina, tmp_path):
    run = LUMINA.prepare(_argv(lumina, tmp_path / "out", extra=["--cache_latents", "--network_train_unet_only"]))
    batch = next(iter(run.loader))
    assert "nextdit_shift" in TIMESTEP_SAMPLINGS
    combos = [(s, "raw") for s in TIMESTEP_SAMPLINGS] + [("shift", p) for p in MODEL_PREDICTION_TYPES[1:]]
    for sampling, prediction in combos:
        settings = FlowMatchingSettings(timestep_sampling=sampling, model_prediction_type=prediction,
                                        discrete_flow_shift=6.0)
        assert_finite_loss_and_gradient(run, batch, settings, (sampling, prediction))


def test_cached_text_outputs_are_keyed_by_the_system_prompt(lumina, tmp_path):
    from library.training.loop import batch_loss

    out = tmp_path / "out"
    cache = out / ".cache" / "text_encoder_outputs"
    losses = {}
    for i, system in enumerate((SYSTEM, "Another system prompt.", SYSTEM)):
        argv = _argv(lumina, out, extra=["--network_train_unet_only", "--cache_text_encoder_outputs_to_disk",
                                         "--cache_latents", "--system_prompt", system])
        run = LUMINA.prepare(argv)
        batch = next(iter(run.loader))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            losses[i] = float(batch_loss(run, batch, 0, timesteps=torch.tensor([500.0, 500.0]), generator=g))
        assert run.text.encoded == (0 if i == 2 else 2)  # the third run reads the first run's entries
        assert len(list(cache.glob("*.safetensors"))) == (2 if i == 0 else 4)
    assert losses[0] == losses[2] and losses[0] != losses[1]


def test_diffusers_folder_and_flash_attn_request(lumina, tmp_path, caplog):
    folder = save_tiny_lumina_diffusers(tmp_path / "diffusers", seed=1)
    argv = train_args(folder, tmp_path / "out", config=lumina["data"], steps=2)
    with caplog.at_level(logging.INFO):
        out = LUMINA.main(argv + ["--gemma2_max_token_length", "8", "--network_train_unet_only", "--use_flash_attn"])
    sd, meta = load_lora(out)
    assert meta["modelspec.architecture"] == "lumina-2/lora" and all(k.startswith("lora_unet_") for k in sd)
    said = [r.getMessage() for r in caplog.records if "Lumina attention" in r.getMessage()]
    assert len(said) == 1 and "sdpa (--use_flash_attn: flash-attn needs" in said[0]


def _flux_like_file(path):
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(12, 4), "img_in.weight": torch.zeros(4, 64)},
              str(path))
    return path


@pytest.mark.parametrize("case, message", [
    ("flux", "this is a model of the FLUX family, which this script does not train; use flux_train_network.py"),
    ("t5_as_gemma", "--gemma2 .*t5.safetensors: this file is a T5 text encoder, not a Gemma2 text encoder"),
    ("no_ae", "--ae is missing"),
    ("swap", "--blocks_to_swap moves weights or activations between the GPU and host memory, and this machine has "
             "no CUDA device"),
    ("swap_limit", "--blocks_to_swap 8: this model has 2 main layers, and at most 0 of them can be swapped"),
    ("offload", "--cpu_offload_checkpointing moves weights or activations"),
    ("sd_flags", "--clip_skip does not apply to Lumina"),
    ("flow", "--min_snr_gamma does not apply to flow-matching training"),
    ("network", "use --network_module networks.lora_lumina"),
    ("network_args", "did you mean 'attn_dim'"),
    ("sage", "--use_sage_attn does not apply to Lumina training"),
    ("length", "--gemma2_max_token_length must be positive"),
])
def test_bad_input_is_one_message_before_any_model_loads(lumina, tmp_path, monkeypatch, case, message):
    import library.models.lumina.loading as loading

    forbid_loading(monkeypatch, loading, "load_lumina_models")
    t5 = tmp_path / "t5.safetensors"
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)}, str(t5))
    edits = {
        "flux": lambda a: a[:1] + [str(_flux_like_file(tmp_path / "flux.safetensors"))] + a[2:],
        "t5_as_gemma": lambda a: [str(t5) if x == str(lumina["gemma2"]) else x for x in a],
        "network_args": lambda a: a + ["--network_args", "atn_dim=4"],
        "sage": lambda a: a + ["--use_sage_attn"],
        "length": lambda a: a + ["--gemma2_max_token_length", "0"],
    }
    with pytest.raises(UserError, match=message):
        LUMINA.main(refusal_argv(_argv(lumina, tmp_path / "out"), case, edits))


def test_a_lumina_file_given_to_the_flux_script_names_the_lumina_scripts(lumina, tmp_path):
    import flux_train_network

    argv = train_args(lumina["lumina"], tmp_path / "out", config=lumina["data"])
    with pytest.raises(UserError, match="LUMINA family.*use lumina_train_network.py or lumina_train.py"):
        flux_train_network.main(argv)


def test_resume_is_bit_exact(lumina, tmp_path):
    extra = ["--cache_latents", "--save_every_n_steps", "2", "--save_state", "--network_dropout", "0.1",
             "--noise_offset", "0.05", "--timestep_sampling", "nextdit_shift"]
    assert_resume_is_bit_exact(LUMINA.file, lambda out, more: _argv(lumina, out, steps=4, extra=more), tmp_path,
                               extra)


def test_lumina2_pipeline_applies_the_converted_lora_with_our_merge_math(lumina, tmp_path):
    import subprocess
    import sys

    from diffusers import Lumina2Pipeline

    from library.models.lumina.conversion import diffusers_to_nextdit, nextdit_to_diffusers

    folder = save_tiny_lumina_diffusers(tmp_path / "diffusers", seed=2)
    lora = LUMINA.main(train_args(folder, tmp_path / "out", config=lumina["data"], steps=2,
                                  extra=["--gemma2_max_token_length", "8", "--learning_rate", "5e-2",
                                         "--network_args", "embedder_dims=[2,2,2]"]))
    converted = tmp_path / "diffusers_lora.safetensors"
    result = subprocess.run([sys.executable, str(ROOT / "networks" / "convert_lumina_lora_to_diffusers.py"),
                             str(lora), str(converted)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "left out 14 Gemma2 modules" in result.stdout
    pipe = Lumina2Pipeline.from_pretrained(folder)
    single = diffusers_to_nextdit(pipe.transformer.state_dict())
    weights = load_file(str(lora))
    by_name = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k, v in single.items() if v.dim() == 2}
    for name in {k.split(".")[0] for k in weights if k.startswith("lora_unet_")}:
        down, up = weights[f"{name}.lora_down.weight"], weights[f"{name}.lora_up.weight"]
        single[by_name[name]] = single[by_name[name]] + float(weights[f"{name}.alpha"]) / down.shape[0] * up @ down
    expected = {k: v for k, v in nextdit_to_diffusers(single).items()}
    pipe.load_lora_weights(str(converted))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, removes the PEFT layers
    applied = pipe.transformer.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(applied[key], value, rtol=1e-5, atol=1e-6, msg=key)
    with pytest.raises(UserError, match="already exists"):
        from networks.convert_lumina_lora_to_diffusers import main as convert

        convert([str(lora), str(converted)])


def test_post_hoc_ema_of_lumina_loras(lumina, tmp_path):
    LUMINA.main(_argv(lumina, tmp_path / "out", steps=3, extra=["--cache_latents", "--network_train_unet_only",
                                                                "--save_every_n_steps", "1"]))
    meta = post_hoc_ema(tmp_path / "out", tmp_path / "ema.safetensors")
    assert meta["modelspec.architecture"] == "lumina-2/lora"
    assert meta["ss_base_model_version"] == "lumina2"


def test_euler_flow_sampler_reaches_the_clean_latents_with_a_perfect_velocity():
    from library.models.lumina.sampling import euler_sample, flow_sigmas, guided

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    sigmas = flow_sigmas(10, 6.0)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and len(sigmas) == 11 and sigmas[5] > 0.5  # shift 6: mostly noisy
    out = euler_sample(lambda x, s: (x - x0) / s, noise, sigmas)  # x_t = (1-s) x0 + s n  =>  n - x0 = (x_t - x0)/s
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    v_c, v_u = torch.ones(1, 4), torch.zeros(1, 4)
    assert torch.allclose(guided(v_c, v_u, 3.0, 1.0), v_c) and torch.allclose(guided(v_c, v_u, 3.0, 0.0), 3 * v_c)


def test_samples_during_training_in_batches(lumina, tmp_path):
    import numpy as np
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat --w 64 --h 64 --d 1 --s 4\na blue dog --w 64 --h 64 --d 2 --s 4 --n ugly --l 2\n"
                       "a green tree --w 96 --h 64 --d 3 --s 3\n", encoding="utf-8")
    images = {}
    for batch in (1, 2):
        out = tmp_path / f"out{batch}"
        extra = ["--cache_latents", "--sample_prompts", str(prompts), "--sample_every_n_steps", "1",
                 "--sample_batch_size", str(batch)]
        LUMINA.main(_argv(lumina, out, steps=1, extra=extra))
        files = sorted((out / "sample").glob("*.png"))
        assert [f.name.split("_")[2] for f in files] == ["00", "01", "02"]
        assert all(f.name.startswith("lora_000001_") for f in files)
        images[batch] = [np.asarray(Image.open(f), dtype=np.int16) for f in files]
    assert images[1][2].shape == (64, 96, 3) and images[1][0].std() > 0
    for a, b in zip(images[1], images[2]):  # batched prompts start from the same per-seed noise
        assert np.abs(a - b).max() <= 2


def test_two_processes(lumina, tmp_path):
    argv = _argv(lumina, tmp_path / "out", config=two_process_dataset(tmp_path), extra=["--cache_latents"])
    sd, _ = run_two_processes(argv, LUMINA.file, tmp_path / "out")
    assert len(sd) == 3 * 39 and trained(sd)


def test_fp8_base_trains_a_lora_close_to_the_bf16_run(lumina, tmp_path):
    """--fp8_base on CPU: the transformer and the frozen Gemma2 in float8, a LoRA that points the same way as the
    bf16 run's."""
    extra = ["--cache_latents", "--network_train_unet_only", "--mixed_precision", "bf16", "--max_grad_norm", "0"]
    plain, _ = load_lora(LUMINA.main(_argv(lumina, tmp_path / "bf16", extra=extra)))
    run = LUMINA.prepare(_argv(lumina, tmp_path / "fp8", extra=extra + ["--fp8_base"]))
    assert run.models.unet.layers[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert run.models.text_encoders[0].layers[0].mlp.up_proj.weight.dtype == torch.float8_e4m3fn
    fp8, meta = load_lora(LUMINA.main(_argv(lumina, tmp_path / "fp8b", extra=extra + ["--fp8_base"])))
    assert_fp8_lora_close(plain, fp8, meta)
