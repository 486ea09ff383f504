"""Caching changes nothing but speed, and the LoRA learns."""

from __future__ import annotations

import pytest
import torch

from tests.train_helpers import dataset_toml, make_images, prepare_run, train_args


def _first_loss(argv) -> tuple[float, object]:
    from library.training.loop import batch_loss

    run = prepare_run(argv)
    batch = next(iter(run.loader))
    with torch.no_grad():
        return float(batch_loss(run, batch, 0)), run


@pytest.fixture
def data(tmp_path):
    return dataset_toml(tmp_path / "data.toml", make_images(tmp_path / "images", count=2))


def test_cached_latents_give_the_same_loss(tiny_sd1_dir, data, tmp_path):
    plain, run = _first_loss(train_args(tiny_sd1_dir, tmp_path / "a", config=data))
    assert "latents" not in next(iter(run.loader))
    cached, run = _first_loss(train_args(tiny_sd1_dir, tmp_path / "b", config=data,
                                         extra=["--cache_latents_to_disk"]))
    assert "latents" in next(iter(run.loader))
    assert list((tmp_path / "images").glob("*.npz"))
    assert cached == pytest.approx(plain, rel=1e-5, abs=1e-7)


def test_cached_text_encoder_outputs_give_the_same_loss(tiny_sd1_dir, data, tmp_path):
    # the text encoder's LoRA trains here, so its outputs are computed every step (its LoRA starts as a no-op)
    uncached, run = _first_loss(train_args(tiny_sd1_dir, tmp_path / "a", config=data))
    assert not run.text.cache
    cached, run = _first_loss(train_args(tiny_sd1_dir, tmp_path / "b", config=data,
                                         extra=["--network_train_unet_only", "--cache_text_encoder_outputs_to_disk"]))
    assert run.text.cache
    assert cached == pytest.approx(uncached, rel=1e-5, abs=1e-7)
    # the encoder ran once per caption; a second pass over the data reuses the outputs
    from library.training.loop import batch_loss

    encoded = run.text.encoded
    for batch in run.loader:
        with torch.no_grad():
            batch_loss(run, batch, 0)
    assert run.text.encoded == encoded == 2
    assert len(list((tmp_path / "b" / ".cache" / "text_encoder_outputs").glob("*.safetensors"))) == 2


def test_frozen_text_encoder_is_not_rerun_without_the_option(tiny_sd1_dir, data, tmp_path):
    from library.training.loop import train

    run = prepare_run(train_args(tiny_sd1_dir, tmp_path / "a", config=data, steps=5,
                              extra=["--network_train_unet_only"]))
    train(run)
    assert run.text.cache and run.text.encoded == 2


def test_lora_learns_the_image(tiny_sd1_dir, tmp_path):
    from library.training.loop import batch_loss, train

    data = dataset_toml(tmp_path / "data.toml", make_images(tmp_path / "images", count=1), batch_size=1)
    run = prepare_run(train_args(tiny_sd1_dir, tmp_path / "out", config=data, steps=40,
                              extra=["--learning_rate", "1e-2", "--network_dim", "8", "--cache_latents",
                                     "--network_train_unet_only"]))
    batch = next(iter(run.loader))

    def error(multiplier: float) -> float:
        scaled = dict(batch, network_multipliers=torch.full((1,), multiplier))
        generator = torch.Generator().manual_seed(123)
        total = 0.0
        with torch.no_grad():
            for t in (100, 300, 500, 700, 900):
                total += float(batch_loss(run, scaled, 0, timesteps=torch.tensor([t]), generator=generator))
        return total

    untrained = error(1.0)
    train(run)
    trained, base = error(1.0), error(0.0)
    assert base == pytest.approx(untrained, rel=1e-4)  # lora_up starts at zero: untrained LoRA = base model
    assert trained < 0.75 * untrained


def test_alpha_mask_weights_the_loss_by_the_mask_area(tiny_sd1_dir, tmp_path):
    import numpy as np
    from PIL import Image

    from library.training.loop import batch_loss

    folder = tmp_path / "rgba"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        pixels = rng.integers(0, 255, (64, 64, 4)).astype("uint8")
        pixels[..., 3] = 0
        pixels[:, 32:, 3] = 255  # only the right half counts
        Image.fromarray(pixels, "RGBA").save(folder / f"m{i}.png")
        (folder / f"m{i}.caption").write_text("sks masked", encoding="utf-8")
    data = dataset_toml(tmp_path / "data.toml", folder, extra_subset="alpha_mask = true")
    run = prepare_run(train_args(tiny_sd1_dir, tmp_path / "out", config=data, extra=["--masked_loss"]))
    batch = next(iter(run.loader))
    masks = batch["alpha_masks"]
    assert masks is not None and masks[:, :, :32].max() == 0 and masks[:, :, 32:].min() == 1

    def loss(mask):
        with torch.no_grad():
            return float(batch_loss(run, dict(batch, alpha_masks=mask), 0, timesteps=torch.tensor([500, 500]),
                                    generator=torch.Generator().manual_seed(5)))

    masked, unmasked = loss(masks), loss(None)
    assert masked != pytest.approx(unmasked, rel=1e-3)
    assert loss(torch.ones_like(masks)) == pytest.approx(unmasked, rel=1e-5)
    assert loss(masks * 0.5) == pytest.approx(masked, rel=1e-5)  # normalized by the mask's area


def test_noise_and_loss_options_reach_the_loop(tiny_sd1_dir, data, tmp_path):
    from library.training.loop import batch_loss
    from library.training.noise import sample_noise_and_timesteps

    options = ["--noise_offset", "0.1", "--adaptive_noise_scale", "0.01", "--multires_noise_iterations", "3",
               "--multires_noise_discount", "0.4", "--ip_noise_gamma", "0.1", "--min_timestep", "100",
               "--max_timestep", "900", "--zero_terminal_snr", "--v_parameterization", "--min_snr_gamma", "5",
               "--scale_v_pred_loss_like_noise_pred", "--debiased_estimation_loss", "--loss_type", "huber",
               "--huber_schedule", "exponential", "--huber_c", "0.2", "--prior_loss_weight", "0.5"]
    reg = make_images(tmp_path / "reg", count=1, caption="a thing", seed=3)
    data = dataset_toml(tmp_path / "reg.toml", tmp_path / "images",
                        extra_subset=f"[[datasets.subsets]]\nimage_dir = '{reg.as_posix()}'\nis_reg = true\n")
    run = prepare_run(train_args(tiny_sd1_dir, tmp_path / "out", config=data, extra=options))
    n, s = run.noise_settings, run.loss_settings
    assert (n.noise_offset, n.adaptive_noise_scale, n.multires_noise_iterations, n.multires_noise_discount,
            n.ip_noise_gamma, n.timestep_range()) == (0.1, 0.01, 3, 0.4, 0.1, (100, 900))
    assert (s.min_snr_gamma, s.loss_type, s.huber_schedule, s.huber_c) == (5, "huber", "exponential", 0.2)
    assert s.v_parameterization and s.scale_v_pred_loss_like_noise_pred and s.debiased_estimation_loss
    assert run.noise_scheduler.config.prediction_type == "v_prediction"
    assert float(run.noise_scheduler.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)  # the corrected schedule
    weights = {float(w) for b in run.loader for w in b["loss_weights"]}
    assert weights == {1.0, 0.5}  # regularization images weigh --prior_loss_weight
    batch = next(iter(run.loader))
    latents = torch.randn(8, 4, 8, 8)
    _, _, t = sample_noise_and_timesteps(latents, run.noise_scheduler, run.noise_settings, run.generator)
    assert 100 <= int(t.min()) and int(t.max()) < 900
    with torch.no_grad():
        assert torch.isfinite(batch_loss(run, batch, 0))
