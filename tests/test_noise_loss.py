"""Noise, timesteps, zero terminal SNR and every loss option, checked against hand computations."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from library.errors import UserError
from library.training.losses import (
    LossSettings, add_loss_arguments, add_v_prediction_like_loss, apply_debiased_estimation, apply_snr_weighting,
    compute_training_loss, conditional_loss, huber_threshold, masked_mean,
    scale_v_prediction_loss_like_noise_prediction, validate_noise_loss_args,
)
from library.training.noise import (
    NoiseSettings, add_noise_arguments, compute_snr, make_noise_scheduler, sample_noise_and_timesteps,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_noise_arguments(parser)
    add_loss_arguments(parser)
    parser.add_argument("--v_parameterization", action="store_true")
    return parser.parse_args(list(argv))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sched():
    return make_noise_scheduler()


def reference_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_defaults_match_sd_scripts():
    a = parse()
    assert (a.loss_type, a.huber_schedule, a.huber_c, a.huber_scale) == ("l2", "snr", 0.1, 1.0)
    assert a.multires_noise_discount == 0.3 and a.noise_offset is None and a.min_timestep is None
    assert not a.zero_terminal_snr and not a.masked_loss


def test_scheduler_schedule_and_snr(sched):
    ref = reference_alphas_cumprod()
    assert torch.allclose(sched.alphas_cumprod.double(), ref, rtol=1e-5)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(compute_snr(sched, t).double(), (ref / (1 - ref))[t], rtol=1e-4)
    assert make_noise_scheduler(v_parameterization=True).config.prediction_type == "v_prediction"


def test_zero_terminal_snr_schedule_and_weights():
    z = make_noise_scheduler(v_parameterization=True, zero_terminal_snr=True)
    assert z.alphas_cumprod[-1].item() == 0.0
    # Lin et al. algorithm 1, computed independently.
    s = reference_alphas_cumprod().sqrt()
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    expected = s**2
    assert torch.allclose(z.alphas_cumprod.double(), expected, atol=1e-6)
    t = torch.tensor([100, 700, 999])
    snr = expected[t] / (1 - expected[t])
    assert compute_snr(z, t)[-1].item() == 0.0
    loss = torch.ones(3)
    w = apply_snr_weighting(loss, t, z, 5.0, v_prediction=True)
    assert torch.allclose(w.double(), torch.minimum(snr, torch.tensor(5.0).double()) / (snr + 1), rtol=1e-4)
    # the weights come from the corrected schedule, not the original one
    orig = reference_alphas_cumprod()[t]
    orig_w = torch.minimum(orig / (1 - orig), torch.tensor(5.0).double()) / (orig / (1 - orig) + 1)
    assert not torch.allclose(w.double(), orig_w, rtol=1e-3)
    # epsilon weight at SNR 0 is the limit 1, not NaN
    we = apply_snr_weighting(loss, t, z, 5.0, v_prediction=False)
    assert torch.isfinite(we).all() and we[-1].item() == 1.0
    # noising at the last timestep gives pure noise
    latents = torch.randn(1, 4, 8, 8, generator=gen(1))
    noise, noisy, _ = sample_noise_and_timesteps(latents, z, NoiseSettings(min_timestep=999), gen())
    assert torch.allclose(noisy, noise, atol=1e-6)


def test_plain_noise_and_timesteps_are_reproducible(sched):
    latents = torch.randn(4, 4, 8, 8, generator=gen(1))
    n1, x1, t1 = sample_noise_and_timesteps(latents, sched, NoiseSettings(), gen(3))
    n2, x2, t2 = sample_noise_and_timesteps(latents, sched, parse(), gen(3))
    assert torch.equal(n1, n2) and torch.equal(x1, x2) and torch.equal(t1, t2)
    assert t1.dtype == torch.long and t1.shape == (4,)
    a = sched.alphas_cumprod[t1].view(-1, 1, 1, 1)
    assert torch.allclose(x1, a.sqrt() * latents + (1 - a).sqrt() * n1, atol=1e-5)
    assert torch.equal(n1, torch.randn(4, 4, 8, 8, generator=gen(3)))


def test_timestep_range(sched):
    latents = torch.zeros(256, 4, 2, 2)
    _, _, t = sample_noise_and_timesteps(latents, sched, NoiseSettings(min_timestep=100, max_timestep=110), gen())
    assert t.min() >= 100 and t.max() <= 109 and len(set(t.tolist())) > 5


def test_noise_offset_adds_per_channel_constant(sched):
    latents = torch.randn(2, 4, 8, 8, generator=gen(1))
    plain, _, _ = sample_noise_and_timesteps(latents, sched, NoiseSettings(), gen(5))
    off, _, _ = sample_noise_and_timesteps(latents, sched, NoiseSettings(noise_offset=0.1), gen(5))
    diff = off - plain
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)
    g = gen(5)
    torch.randn(2, 4, 8, 8, generator=g)
    assert torch.allclose(diff[:, :, 0, 0], 0.1 * torch.randn(2, 4, 1, 1, generator=g)[:, :, 0, 0], atol=1e-6)


def test_noise_offset_random_strength_and_adaptive(sched):
    latents = torch.randn(2, 4, 8, 8, generator=gen(1)) + 0.5
    plain, _, _ = sample_noise_and_timesteps(latents, sched, NoiseSettings(), gen(5))
    s = NoiseSettings(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.2)
    off, _, _ = sample_noise_and_timesteps(latents, sched, s, gen(5))
    g = gen(5)
    torch.randn(2, 4, 8, 8, generator=g)
    strength = torch.rand(1, generator=g)
    offset = (0.1 * strength + 0.2 * latents.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
    expected = offset * torch.randn(2, 4, 1, 1, generator=g)
    assert torch.allclose(off - plain, expected.expand_as(plain), atol=1e-5)


def test_multires_noise_is_normalized_and_correlated(sched):
    latents = torch.zeros(2, 4, 32, 32)
    plain, _, _ = sample_noise_and_timesteps(latents, sched, NoiseSettings(), gen(5))
    settings = NoiseSettings(multires_noise_iterations=6, multires_noise_discount=0.9)
    pyr, _, _ = sample_noise_and_timesteps(latents, sched, settings, gen(5))
    assert abs(pyr.std().item() - 1.0) < 1e-4
    assert not torch.allclose(pyr, plain / plain.std())
    # low-frequency components make neighbouring pixels correlated
    def neighbour_corr(x):
        return torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1].item()
    assert neighbour_corr(pyr) > neighbour_corr(plain) + 0.05


def test_ip_noise_gamma_perturbs_input_not_target(sched):
    latents = torch.randn(2, 4, 8, 8, generator=gen(1))
    n0, x0, t0 = sample_noise_and_timesteps(latents, sched, NoiseSettings(), gen(5))
    n1, x1, t1 = sample_noise_and_timesteps(latents, sched, NoiseSettings(ip_noise_gamma=0.1), gen(5))
    assert torch.equal(n0, n1) and torch.equal(t0, t1)
    g = gen(5)
    torch.randn(2, 4, 8, 8, generator=g)
    torch.randint(0, 1000, (2,), generator=g)
    extra = torch.randn(2, 4, 8, 8, generator=g)
    expected = sched.add_noise(latents, n1 + 0.1 * extra, t1)
    assert torch.allclose(x1, expected, atol=1e-6) and not torch.allclose(x1, x0)
    _, x2, _ = sample_noise_and_timesteps(
        latents, sched, NoiseSettings(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True), gen(5))
    assert not torch.allclose(x2, x1) and not torch.allclose(x2, x0)


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
def test_conditional_loss_values(loss_type):
    p = torch.tensor([[0.0, 1.0, -2.0]])
    t = torch.tensor([[0.5, 1.0, 1.0]])
    d = (p - t).double()
    c = 0.3
    expected = {
        "l2": d**2, "l1": d.abs(),
        "huber": 2 * c * (torch.sqrt(d**2 + c * c) - c),
        "smooth_l1": 2 * (torch.sqrt(d**2 + c * c) - c),
    }[loss_type]
    assert torch.allclose(conditional_loss(p, t, loss_type, c).double(), expected, atol=1e-6)


def test_conditional_loss_per_sample_c():
    p, t = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    out = conditional_loss(p, t, "huber", torch.tensor([0.1, 1.0]))
    assert math.isclose(out[0, 0, 0, 0].item(), 0.2 * (math.sqrt(1.01) - 0.1), rel_tol=1e-5)
    assert math.isclose(out[1, 0, 0, 0].item(), 2 * (math.sqrt(2) - 1), rel_tol=1e-5)


def test_huber_schedules(sched):
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(huber_threshold(t, sched, "constant", 0.1, 2.0), torch.full((3,), 0.2))
    alpha = -math.log(0.1) / 1000
    exp = torch.tensor([math.exp(-alpha * v) * 2.0 for v in (0, 500, 999)])
    assert torch.allclose(huber_threshold(t, sched, "exponential", 0.1, 2.0), exp, rtol=1e-5)
    a = reference_alphas_cumprod()[t]
    sig = ((1 - a) / a).sqrt()
    snr_c = (0.9 / (1 + sig) ** 2 + 0.1).float()
    assert torch.allclose(huber_threshold(t, sched, "snr", 0.1, 1.0), snr_c, rtol=1e-4)
    # unlike the reference, huber_scale applies to the snr schedule too
    assert torch.allclose(huber_threshold(t, sched, "snr", 0.1, 3.0), 3 * snr_c, rtol=1e-4)


def test_snr_weightings_match_formulas(sched):
    t = torch.tensor([1, 50, 400, 900])
    snr = (reference_alphas_cumprod() / (1 - reference_alphas_cumprod()))[t]
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ld = loss.double()
    g = torch.tensor(5.0, dtype=torch.float64)
    checks = [
        (apply_snr_weighting(loss, t, sched, 5.0, False), ld * torch.minimum(snr, g) / snr),
        (apply_snr_weighting(loss, t, sched, 5.0, True), ld * torch.minimum(snr, g) / (snr + 1)),
        (scale_v_prediction_loss_like_noise_prediction(loss, t, sched),
         ld * snr.clamp(max=1000) / (snr.clamp(max=1000) + 1)),
        (add_v_prediction_like_loss(loss, t, sched, 0.5),
         ld + ld * (snr.clamp(max=1000) + 1) / snr.clamp(max=1000) * 0.5),
        (apply_debiased_estimation(loss, t, sched, False), ld / snr.clamp(max=1000).sqrt()),
        (apply_debiased_estimation(loss, t, sched, True), ld / (snr.clamp(max=1000) + 1)),
    ]
    for got, want in checks:
        assert torch.allclose(got.double(), want, rtol=1e-4)


def test_masked_mean_is_normalized_by_area():
    loss = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).view(2, 4, 4, 4)
    mask = torch.zeros(2, 32, 32)
    mask[0, :16, :16] = 1.0  # top-left quarter -> latent [:2, :2]
    mask[1] = 1.0
    out = masked_mean(loss, mask)
    assert torch.allclose(out[0], loss[0, :, :2, :2].mean())
    assert torch.allclose(out[1], loss[1].mean())
    # half-transparent mask: weighted mean, still normalized
    half = torch.full((1, 32, 32), 0.5)
    assert torch.allclose(masked_mean(loss[:1], half), loss[0].mean())
    assert masked_mean(loss[:1], torch.zeros(1, 32, 32)).item() == 0.0


def test_compute_training_loss_combines_everything(sched):
    pred = torch.randn(2, 4, 4, 4, generator=gen(1))
    target = torch.randn(2, 4, 4, 4, generator=gen(2))
    t = torch.tensor([10, 600])
    w = torch.tensor([1.0, 0.5])
    plain = compute_training_loss(pred, target, t, sched, settings=LossSettings(), loss_weights=w)
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * w
    assert torch.allclose(plain, per.mean())
    s = LossSettings(min_snr_gamma=5.0)
    got = compute_training_loss(pred, target, t, sched, settings=s, loss_weights=w)
    assert torch.allclose(got, apply_snr_weighting(per, t, sched, 5.0, False).mean())
    mask = torch.zeros(2, 32, 32)
    mask[:, :, :16] = 1
    masked = compute_training_loss(pred, target, t, sched, settings=parse(), loss_weights=None, masks=mask)
    assert torch.allclose(masked, ((pred - target) ** 2)[..., :2].mean(dim=(1, 2, 3)).mean())
    hub = compute_training_loss(pred, target, t, sched, settings=parse("--loss_type", "huber"), loss_weights=None)
    c = huber_threshold(t, sched, "snr", 0.1).view(-1, 1, 1, 1)
    want = (2 * c * (torch.sqrt((pred - target) ** 2 + c * c) - c)).mean()
    assert torch.allclose(hub, want, rtol=1e-5)
    args = parse("--v_parameterization", "--scale_v_pred_loss_like_noise_pred", "--debiased_estimation_loss",
                 "--loss_type", "smooth_l1", "--huber_schedule", "exponential")
    validate_noise_loss_args(args)
    out = compute_training_loss(pred, target, t, sched, settings=args, loss_weights=w)
    assert out.ndim == 0 and torch.isfinite(out)
    args = parse("--v_pred_like_loss", "0.1", "--loss_type", "l1")
    assert compute_training_loss(pred, target, t, sched, settings=args, loss_weights=w) > \
        compute_training_loss(pred, target, t, sched, settings=parse("--loss_type", "l1"), loss_weights=w)


@pytest.mark.parametrize("argv, fragment", [
    (["--scale_v_pred_loss_like_noise_pred"], "--v_parameterization"),
    (["--v_pred_like_loss", "0.2", "--v_parameterization"], "--v_pred_like_loss"),
    (["--adaptive_noise_scale", "0.1"], "--noise_offset"),
    (["--min_timestep", "500", "--max_timestep", "400"], "--min_timestep"),
    (["--max_timestep", "1001"], "--max_timestep"),
    (["--loss_type", "huber", "--huber_c", "0"], "--huber_c"),
    (["--zero_terminal_snr", "--debiased_estimation_loss"], "--zero_terminal_snr"),
    (["--ip_noise_gamma_random_strength"], "--ip_noise_gamma"),
])
def test_option_conflicts_are_user_errors(argv, fragment):
    with pytest.raises(UserError) as err:
        validate_noise_loss_args(parse(*argv))
    assert fragment in err.value.message


def test_all_problems_reported_at_once():
    with pytest.raises(UserError) as err:
        validate_noise_loss_args(parse("--scale_v_pred_loss_like_noise_pred", "--adaptive_noise_scale", "1"))
    assert "2 problems" in err.value.message


def test_valid_combinations_pass():
    validate_noise_loss_args(parse("--noise_offset", "0.1", "--adaptive_noise_scale", "0.01", "--min_snr_gamma", "5"))
    validate_noise_loss_args(parse("--zero_terminal_snr", "--v_parameterization", "--debiased_estimation_loss"))
    validate_noise_loss_args(parse("--noise_offset", "0.1", "--multires_noise_iterations", "4"))  # allowed upstream
