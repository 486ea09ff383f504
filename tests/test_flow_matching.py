"""The flow-matching objective: sigma sampling, noisy inputs, targets, weightings and the sigma_scaled fix."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from library.training.flow_matching import (
    FlowDefaults, FlowMatchingSettings, TIMESTEP_SAMPLINGS, add_flow_matching_arguments, discrete_sigmas,
    flow_huber_threshold, flow_matching_loss, flow_option_problems, flux_time_shift, loss_weighting,
    make_flow_batch, prediction_and_target, sample_sigmas,
)
from library.training.losses import LossSettings, add_loss_arguments
from library.training.noise import NoiseSettings, add_noise_arguments


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _settings(**kw) -> FlowMatchingSettings:
    return FlowMatchingSettings(**kw)


def test_parser_defaults_follow_the_family_and_sd_scripts_names():
    p = argparse.ArgumentParser()
    add_flow_matching_arguments(p, FlowDefaults(timestep_sampling="shift", discrete_flow_shift=6.0))
    a = p.parse_args([])
    assert (a.timestep_sampling, a.discrete_flow_shift, a.sigmoid_scale) == ("shift", 6.0, 1.0)
    assert (a.model_prediction_type, a.weighting_scheme, a.logit_mean, a.logit_std, a.mode_scale) == (
        "raw", "uniform", 0.0, 1.0, 1.29)
    a = p.parse_args(["--timestep_sampling", "flux_shift", "--model_prediction_type", "sigma_scaled",
                      "--weighting_scheme", "logit_normal", "--sigmoid_scale", "2"])
    assert FlowMatchingSettings.from_args(a) == _settings(
        timestep_sampling="flux_shift", model_prediction_type="sigma_scaled", weighting_scheme="logit_normal",
        sigmoid_scale=2.0, discrete_flow_shift=6.0)


def test_discrete_schedule_equals_diffusers_flow_match_scheduler():
    for shift in (1.0, 3.0, 6.0):
        expected = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).sigmas[:1000]
        torch.testing.assert_close(discrete_sigmas(shift), expected.float(), rtol=0, atol=1e-6)


def test_flux_shift_equals_the_flux_pipeline_schedule():
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    s = torch.linspace(0.01, 0.99, 50)
    for seq_len in (256, 1024, 4096):
        mu = calculate_shift(seq_len)
        torch.testing.assert_close(flux_time_shift(s, seq_len), sched.time_shift(mu, 1.0, s), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", TIMESTEP_SAMPLINGS)
def test_every_sampling_is_in_range_and_reproducible(mode):
    st = _settings(timestep_sampling=mode)
    a = sample_sigmas(st, 4096, (64, 64), _gen(3))
    b = sample_sigmas(st, 4096, (64, 64), _gen(3))
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape == (4096,)
    assert float(a.min()) > 0 and float(a.max()) <= 1


def test_sampling_distributions_have_the_expected_shape():
    n = 20000
    mean = lambda **kw: float(sample_sigmas(_settings(**kw), n, (128, 128), _gen(1)).mean())  # noqa: E731
    assert abs(mean(timestep_sampling="uniform") - 0.5) < 0.01
    assert abs(mean(timestep_sampling="sigmoid") - 0.5) < 0.01
    # a larger shift and a larger image push sigma towards noise
    assert mean(timestep_sampling="shift", discrete_flow_shift=3.0) > mean(timestep_sampling="shift",
                                                                           discrete_flow_shift=1.5) > 0.55
    small = float(sample_sigmas(_settings(timestep_sampling="flux_shift"), n, (32, 32), _gen(1)).mean())
    large = float(sample_sigmas(_settings(timestep_sampling="flux_shift"), n, (128, 128), _gen(1)).mean())
    assert large > small > 0.5
    # the 'sigma' mode draws from the shifted table: shift 1 is ~uniform, shift 3 leans to noise
    assert abs(mean(timestep_sampling="sigma", discrete_flow_shift=1.0) - 0.5) < 0.01
    assert mean(timestep_sampling="sigma", discrete_flow_shift=3.0) > 0.65
    assert mean(timestep_sampling="sigma", discrete_flow_shift=1.0, weighting_scheme="mode") < 0.5


def test_sigma_mode_indexes_the_table_with_the_density_draw():
    st = _settings(timestep_sampling="sigma", discrete_flow_shift=3.0, weighting_scheme="logit_normal",
                   logit_mean=0.5, logit_std=2.0)
    got = sample_sigmas(st, 64, (16, 16), _gen(5))
    u = torch.sigmoid(torch.randn(64, generator=_gen(5)) * 2.0 + 0.5)
    expected = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas[(u * 1000).long()]
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-6)


def test_noisy_input_and_target():
    latents = torch.randn(3, 16, 8, 8, generator=_gen(0))
    st = _settings(timestep_sampling="uniform")
    fb = make_flow_batch(latents, st, generator=_gen(7))
    s = fb.sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(fb.noisy, (1 - s) * latents + s * fb.noise)
    torch.testing.assert_close(fb.timesteps, fb.sigmas * 1000)
    # the draw order is noise, then sigma
    g = _gen(7)
    torch.testing.assert_close(fb.noise, torch.randn(latents.shape, generator=g))
    torch.testing.assert_close(fb.sigmas, torch.rand(3, generator=g))
    pred, target, weighting = prediction_and_target(fb.noise - latents, latents, fb, st)
    assert weighting is None and torch.equal(target, fb.noise - latents)


def test_input_perturbation_changes_the_input_not_the_target():
    latents = torch.randn(2, 16, 8, 8, generator=_gen(0))
    st = _settings(timestep_sampling="uniform")
    plain = make_flow_batch(latents, st, generator=_gen(1))
    ip = make_flow_batch(latents, st, NoiseSettings(ip_noise_gamma=0.1), generator=_gen(1))
    assert torch.equal(plain.noise, ip.noise) and torch.equal(plain.sigmas, ip.sigmas)
    assert not torch.allclose(plain.noisy, ip.noisy)
    offset = make_flow_batch(latents, st, NoiseSettings(noise_offset=0.1), generator=_gen(1))
    assert not torch.equal(offset.noise, plain.noise)


def _perfect_velocity_losses(n: int = 16) -> dict[str, float]:
    """MSE scored by a perfect velocity predictor under each prediction type (ours) and sd-scripts' form."""
    latents = torch.randn(n, 16, 16, 16, generator=_gen(0))
    out = {}
    for mode in ("raw", "additive", "sigma_scaled"):
        st = _settings(model_prediction_type=mode, timestep_sampling="sigmoid")
        fb = make_flow_batch(latents, st, generator=_gen(2))
        pred, target, w = prediction_and_target(fb.noise - latents, latents, fb, st)
        out[mode] = float(flow_matching_loss(pred, target, fb.sigmas, settings=LossSettings(), weighting=w))
    # sd-scripts' sigma_scaled: the x0 estimate against the velocity
    s = fb.sigmas.view(-1, 1, 1, 1)
    x0_estimate = fb.noisy - s * (fb.noise - latents)
    out["sd_scripts_sigma_scaled"] = float(((x0_estimate - (fb.noise - latents)) ** 2).mean())
    return out


def test_sigma_scaled_compares_like_with_like():
    losses = _perfect_velocity_losses()
    assert losses["raw"] < 1e-10 and losses["sigma_scaled"] < 1e-10
    # sd-scripts' form: a perfect model still scores about 5 (x0 vs noise - x0: |2 x0 - noise|^2 ~ 4 + 1)
    assert 4.0 < losses["sd_scripts_sigma_scaled"] < 6.0
    assert losses["additive"] > 0.3


def test_sigma_scaled_with_sigma_sqrt_weighting_is_the_velocity_loss():
    latents = torch.randn(4, 16, 8, 8, generator=_gen(0))
    model_out = torch.randn(4, 16, 8, 8, generator=_gen(9))
    raw = _settings(model_prediction_type="raw", timestep_sampling="uniform")
    scaled = _settings(model_prediction_type="sigma_scaled", timestep_sampling="uniform", weighting_scheme="sigma_sqrt")
    fb = make_flow_batch(latents, raw, generator=_gen(3))
    p1, t1, w1 = prediction_and_target(model_out, latents, fb, raw)
    p2, t2, w2 = prediction_and_target(model_out, latents, fb, scaled)
    l1 = flow_matching_loss(p1, t1, fb.sigmas, settings=LossSettings(), weighting=w1)
    l2 = flow_matching_loss(p2, t2, fb.sigmas, settings=LossSettings(), weighting=w2)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=0)


def test_sigma_scaled_training_learns_the_velocity():
    """Optimising the output directly: ours converges to noise - x0; sd-scripts' comparison does not."""
    latents = torch.randn(4, 4, 4, 4, generator=_gen(0))
    st = _settings(model_prediction_type="sigma_scaled", timestep_sampling="uniform", weighting_scheme="sigma_sqrt")
    fb = make_flow_batch(latents, st, generator=_gen(1))
    velocity = fb.noise - latents
    out = torch.zeros_like(latents, requires_grad=True)
    opt = torch.optim.Adam([out], lr=0.05)
    for _ in range(400):
        pred, target, w = prediction_and_target(out, latents, fb, st)
        loss = flow_matching_loss(pred, target, fb.sigmas, settings=LossSettings(), weighting=w)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float((out.detach() - velocity).abs().max()) < 0.02
    # sd-scripts' minimiser is (x_t - v) / sigma, far from the velocity
    s = fb.sigmas.view(-1, 1, 1, 1)
    assert float(((fb.noisy - velocity) / s - velocity).abs().mean()) > 1.0


def test_weightings():
    s = torch.tensor([0.25, 0.5, 0.75])
    torch.testing.assert_close(loss_weighting("sigma_sqrt", s), s**-2)
    torch.testing.assert_close(loss_weighting("cosmap", s), 2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    for scheme in ("uniform", "none", "logit_normal", "mode"):
        assert torch.equal(loss_weighting(scheme, s), torch.ones(3))


def test_huber_schedules_work_on_sigmas():
    s = torch.tensor([0.001, 0.5, 0.999])
    torch.testing.assert_close(flow_huber_threshold(s, "constant", 0.1, 2.0), torch.full((3,), 0.2))
    alpha = -math.log(0.1) / 1000  # sd-scripts: exp(-alpha * timesteps), timesteps = 1000 sigma
    torch.testing.assert_close(flow_huber_threshold(s, "exponential", 0.1), torch.exp(-alpha * s * 1000))
    snr = flow_huber_threshold(s, "snr", 0.1)
    assert float(snr[0]) > 0.99 and float(snr[2]) < 0.11 and bool((snr[:-1] > snr[1:]).all())
    pred, target = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    loss = flow_matching_loss(pred, target, s, settings=LossSettings(loss_type="huber", huber_schedule="snr"))
    assert torch.isfinite(loss) and float(loss) > 0


def test_masked_loss_and_loss_weights():
    pred, target = torch.zeros(2, 16, 4, 4), torch.ones(2, 16, 4, 4)
    target[:, :, :, 2:] = 3.0
    masks = torch.zeros(2, 8, 8)
    masks[:, :, :4] = 1.0  # left half of the image: loss 1 there
    s = torch.tensor([0.5, 0.5])
    loss = flow_matching_loss(pred, target, s, settings=LossSettings(), masks=masks, loss_weights=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(loss, torch.tensor(2.0))


def test_sd_only_and_out_of_range_options_are_reported_together():
    p = argparse.ArgumentParser()
    add_flow_matching_arguments(p)
    add_noise_arguments(p)
    add_loss_arguments(p)
    p.add_argument("--v_parameterization", action="store_true")
    a = p.parse_args(["--min_snr_gamma", "5", "--v_parameterization", "--sigmoid_scale", "0", "--max_timestep", "900"])
    problems = flow_option_problems(a)
    text = "\n".join(problems)
    assert len(problems) == 4
    for name in ("--min_snr_gamma", "--v_parameterization", "--sigmoid_scale", "--max_timestep"):
        assert name in text
    assert flow_option_problems(p.parse_args([])) == []
