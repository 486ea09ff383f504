"""Loading tiny SD1/SD2 models from diffusers folders and single files."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import pytest
import torch

from library.errors import UserError
from library.models.loading import SDModels, load_sd_models
from library.models.tiny import TinyConfig, build_tiny_components


def _args(path, **kw) -> argparse.Namespace:
    return argparse.Namespace(pretrained_model_name_or_path=str(path), **kw)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def assert_same_models(a: SDModels, b: SDModels) -> None:
    assert a.family == b.family
    assert_same_weights(a.unet, b.unet)
    assert_same_weights(a.vae, b.vae)
    assert_same_weights(a.text_encoders[0], b.text_encoders[0])
    for key in ("block_out_channels", "attention_head_dim", "cross_attention_dim", "use_linear_projection",
                "layers_per_block", "norm_num_groups", "sample_size", "down_block_types", "up_block_types"):
        assert _plain(a.unet.config[key]) == _plain(b.unet.config[key]), key
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor"):
        assert _plain(a.vae.config[key]) == _plain(b.vae.config[key]), key
    ta, tb = a.text_encoders[0].config, b.text_encoders[0].config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act"):
        assert getattr(ta, key) == getattr(tb, key), key


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("sd2", [False, True])
def test_diffusers_folder_loads_the_saved_weights(sd2, tiny_sd1_dir, tiny_sd2_dir):
    folder = tiny_sd2_dir if sd2 else tiny_sd1_dir
    models = load_sd_models(_args(folder, v2=sd2))
    reference = build_tiny_components(TinyConfig(sd2=sd2))
    assert_same_weights(models.unet, reference["unet"])
    assert_same_weights(models.vae, reference["vae"])
    assert_same_weights(models.text_encoders[0], reference["text_encoder"])
    assert models.family.name == ("sd2" if sd2 else "sd1")
    assert models.tokenizers[0].pad_token_id == (0 if sd2 else 49407)
    assert models.model_hashes == {}
    assert all(p.device.type == "cpu" for p in models.unet.parameters())
    sched = models.noise_scheduler()
    assert sched.config.prediction_type == "epsilon" and sched.config.num_train_timesteps == 1000
    assert sched.config.beta_schedule == "scaled_linear" and not sched.config.clip_sample


def test_dtype_and_v_parameterization(tiny_sd2_dir):
    models = load_sd_models(_args(tiny_sd2_dir, v2=True, v_parameterization=True), dtype=torch.bfloat16)
    assert models.unet.dtype == torch.bfloat16 and models.text_encoders[0].dtype == torch.bfloat16
    assert models.family.base_model_version == "sd_v2_v"
    assert models.family.modelspec_architecture == "stable-diffusion-v2-768-v"
    assert models.noise_scheduler().config.prediction_type == "v_prediction"


def test_v2_flag_mismatch_is_an_error(tiny_sd1_dir, tiny_sd2_dir):
    with pytest.raises(UserError, match="add --v2|Add --v2"):
        load_sd_models(_args(tiny_sd2_dir))
    with pytest.raises(UserError, match="Remove --v2"):
        load_sd_models(_args(tiny_sd1_dir, v2=True))


def test_path_errors_before_loading(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_sd_models(_args(tmp_path / "missing.safetensors"))
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(UserError, match="unsupported model file type"):
        load_sd_models(_args(tmp_path / "model.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a diffusers model"):
        load_sd_models(_args(tmp_path / "empty"))
    with pytest.raises(UserError, match="required"):
        load_sd_models(argparse.Namespace(pretrained_model_name_or_path=None))


def test_hub_id_offline_says_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as err:
        load_sd_models(_args("someone/not-cached-model"))
    assert "HF_HUB_OFFLINE" in err.value.message and "hf download someone/not-cached-model" in err.value.message
