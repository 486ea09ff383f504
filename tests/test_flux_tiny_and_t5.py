"""The tiny FLUX builder (BFL files and diffusers folder) and the offline T5 tokenizer / config."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.errors import UserError
from library.models.flux.conversion import bfl_to_diffusers, layout_of, read_architecture
from library.models.flux.tiny import FLUX_LATENT_SCALE, FLUX_LATENT_SHIFT, TinyFluxConfig, build_tiny_flux
from library.models.flux.tiny import save_tiny_flux_diffusers, save_tiny_flux_files
from library.models.ldm_conversion import is_ldm_vae, vae_ldm_to_diffusers
from library.models.t5 import T5_TOKENIZER_ID, infer_t5_config, is_t5_encoder, load_t5_tokenizer


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    return save_tiny_flux_files(tmp_path_factory.mktemp("flux_bfl"), seed=3)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return save_tiny_flux_diffusers(tmp_path_factory.mktemp("flux_diffusers") / "model", seed=3)


def _shapes(path):
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_bfl_files_have_the_download_layouts(flux_files):
    shapes = _shapes(flux_files["flux"])
    assert layout_of(shapes) == "bfl"
    arch = read_architecture(shapes)
    assert arch == TinyFluxConfig().architecture() and arch.variant == "dev"
    assert is_t5_encoder(_shapes(flux_files["t5xxl"]))
    assert not is_t5_encoder(_shapes(flux_files["clip_l"]))
    assert "text_model.embeddings.token_embedding.weight" in _shapes(flux_files["clip_l"])
    assert is_ldm_vae(_shapes(flux_files["ae"]))


def test_bfl_files_and_diffusers_folder_hold_the_same_model(flux_files, flux_folder):
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(flux_folder / "transformer")
    converted = bfl_to_diffusers(load_file(str(flux_files["flux"])))
    assert all(torch.equal(v, converted[k]) for k, v in transformer.state_dict().items())
    ae = AutoencoderKL.from_pretrained(flux_folder / "vae")
    assert (ae.config.scaling_factor, ae.config.shift_factor, ae.config.latent_channels) == (
        FLUX_LATENT_SCALE, FLUX_LATENT_SHIFT, 16)
    ae_bfl = vae_ldm_to_diffusers(load_file(str(flux_files["ae"])))
    assert all(torch.equal(v, ae_bfl[k]) for k, v in ae.state_dict().items())


def test_t5_config_is_read_from_shapes(flux_files):
    from transformers import T5EncoderModel

    config = infer_t5_config(_shapes(flux_files["t5xxl"]))
    built = build_tiny_flux(seed=3)["t5"].config
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "feed_forward_proj"):
        assert getattr(config, name) == getattr(built, name), name
    model = T5EncoderModel(config)
    missing, unexpected = model.load_state_dict(load_file(str(flux_files["t5xxl"])), strict=False)
    assert missing == ["encoder.embed_tokens.weight"] and unexpected == []  # tied to shared.weight


def test_diffusers_folder_samples_with_flux_pipeline(flux_folder):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_folder)
    out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, max_sequence_length=16,
               output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_t5_tokenizer_lookup_order(flux_files, flux_folder, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    from_folder = load_t5_tokenizer(model_dir=flux_folder)
    from_cache = load_t5_tokenizer(model_dir=flux_files["flux"], cache_dir=flux_files["tokenizer_cache_dir"])
    ids = from_folder("a photo of a cat").input_ids
    assert ids == from_cache("a photo of a cat").input_ids and ids[-1] == from_folder.eos_token_id == 1
    with pytest.raises(UserError) as err:
        load_t5_tokenizer(model_dir=flux_files["flux"], cache_dir=tmp_path / "nothing")
    text = err.value.message
    assert "no T5 tokenizer found offline" in text and str(tmp_path / "nothing" / "google_t5-v1_1-xxl") in text
    assert T5_TOKENIZER_ID in text and "spiece.model" in text


def test_incomplete_t5_tokenizer_folder_is_one_message(tmp_path):
    broken = tmp_path / "cache" / "google_t5-v1_1-xxl"
    broken.mkdir(parents=True)
    (broken / "tokenizer.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match="google_t5-v1_1-xxl"):
        load_t5_tokenizer(cache_dir=tmp_path / "cache")
