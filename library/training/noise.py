"""Training noise, timesteps and the noise schedule.

Public API (stable, used by ``library.training.loop``):

- ``add_noise_arguments(parser)``: sd-scripts options ``--noise_offset``, ``--noise_offset_random_strength``,
  ``--adaptive_noise_scale``, ``--multires_noise_iterations``, ``--multires_noise_discount`` (0.3),
  ``--ip_noise_gamma``, ``--ip_noise_gamma_random_strength``, ``--min_timestep``, ``--max_timestep``,
  ``--zero_terminal_snr``.
- ``NoiseSettings.from_args(args)``: the options above as a frozen dataclass.
- ``make_noise_scheduler(v_parameterization, zero_terminal_snr) -> DDPMScheduler``: the SD training schedule
  (scaled_linear 0.00085..0.012, 1000 steps). With ``zero_terminal_snr`` the betas are rescaled (Lin et al.,
  arXiv 2305.08891) when the scheduler is built, so everything that later reads ``alphas_cumprod`` (SNR
  weights, huber schedule, ``add_noise``) sees the corrected schedule. The reference tool cached an SNR table
  before rescaling, so its min-SNR / debiased weights used the old schedule; there is no cached table here.
- ``compute_snr(scheduler, timesteps) -> Tensor[B]``: ``alpha_bar / (1 - alpha_bar)``.
- ``sample_noise_and_timesteps(latents, scheduler, settings, generator) -> (noise, noisy_latents, timesteps)``.

All random draws take a ``torch.Generator`` (on any device; values are drawn on the generator's device and
moved to the latents' device), so a run seeded the same way draws the same noise on CPU and GPU.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from library.models.families import SD_SCHEDULE


NUM_TRAIN_TIMESTEPS = SD_SCHEDULE["num_train_timesteps"]


def add_noise_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the noise / timestep options (sd-scripts names and defaults)."""
    g = parser.add_argument_group("noise and timesteps")
    g.add_argument("--noise_offset", type=float, default=None,
                   help="add a per-channel constant of this scale to the noise (0.1 is typical)")
    g.add_argument("--noise_offset_random_strength", action="store_true",
                   help="scale the noise offset by U(0,1) each step")
    g.add_argument("--adaptive_noise_scale", type=float, default=None,
                   help="add |mean(latents per channel)| * this to the noise offset (needs --noise_offset)")
    g.add_argument("--multires_noise_iterations", type=int, default=None,
                   help="pyramid (multi-resolution) noise levels, 6-10 is typical")
    g.add_argument("--multires_noise_discount", type=float, default=0.3,
                   help="weight of each further pyramid noise level (default 0.3)")
    g.add_argument("--ip_noise_gamma", type=float, default=None,
                   help="input perturbation noise strength (0.1 is typical); the target stays the plain noise")
    g.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                   help="scale --ip_noise_gamma by U(0,1) each step")
    g.add_argument("--min_timestep", type=int, default=None, help="smallest training timestep (default 0)")
    g.add_argument("--max_timestep", type=int, default=None,
                   help="training timesteps are below this (default 1000)")
    g.add_argument("--zero_terminal_snr", action="store_true",
                   help="rescale the noise schedule to zero terminal SNR (use with --v_parameterization)")


@dataclass(frozen=True)
class NoiseSettings:
    """Resolved noise options; field names match the command-line options."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None

    @classmethod
    def from_args(cls, args: Any) -> "NoiseSettings":
        """Read the fields from an argparse namespace (missing attributes keep their defaults)."""
        defaults = cls()
        return cls(**{f: getattr(args, f, getattr(defaults, f)) for f in cls.__dataclass_fields__})

    def timestep_range(self, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, int]:
        lo = 0 if self.min_timestep is None else self.min_timestep
        hi = num_train_timesteps if self.max_timestep is None else self.max_timestep
        return lo, hi


def noise_option_problems(args: Any) -> list[str]:
    """Problems with the noise options alone (``losses.validate_noise_loss_args`` reports them all at once)."""
    s = NoiseSettings.from_args(args)
    problems = []
    if s.adaptive_noise_scale is not None and s.noise_offset is None:
        problems.append("--adaptive_noise_scale only works together with --noise_offset; add --noise_offset "
                        "(e.g. 0.1) or remove --adaptive_noise_scale")
    if s.multires_noise_iterations is not None and s.multires_noise_iterations < 0:
        problems.append(f"--multires_noise_iterations must not be negative, got {s.multires_noise_iterations}")
    if s.noise_offset_random_strength and s.noise_offset is None:
        problems.append("--noise_offset_random_strength needs --noise_offset")
    if s.ip_noise_gamma_random_strength and s.ip_noise_gamma is None:
        problems.append("--ip_noise_gamma_random_strength needs --ip_noise_gamma")
    if s.ip_noise_gamma is not None and s.ip_noise_gamma < 0:
        problems.append(f"--ip_noise_gamma must not be negative, got {s.ip_noise_gamma}")
    lo, hi = s.timestep_range()
    if not (0 <= lo < hi <= NUM_TRAIN_TIMESTEPS):
        problems.append(f"timesteps must satisfy 0 <= --min_timestep < --max_timestep <= {NUM_TRAIN_TIMESTEPS}, "
                        f"got min {lo} and max {hi}")
    return problems


def make_noise_scheduler(v_parameterization: bool = False, zero_terminal_snr: bool = False) -> DDPMScheduler:
    """The SD1/SD2 training schedule, rescaled to zero terminal SNR if asked (before anything reads it)."""
    # rescale_betas_zero_snr applies Algorithm 1 of Lin et al. (shift and scale sqrt(alpha_bar) so the last
    # one is 0) to the betas in the constructor, before alphas_cumprod exists.
    return DDPMScheduler(
        **SD_SCHEDULE, clip_sample=False,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
        rescale_betas_zero_snr=zero_terminal_snr,
    )


def compute_snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``alpha_bar_t / (1 - alpha_bar_t)`` per timestep (float32, timesteps' device)."""
    a = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
    return a / (1.0 - a)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device, like.dtype)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


def apply_noise_offset(noise: torch.Tensor, latents: torch.Tensor, settings: NoiseSettings,
                       generator: torch.Generator | None) -> torch.Tensor:
    """``noise + offset * randn(B, C, 1, 1)``; offset optionally random-scaled and adapted to latent means."""
    offset: torch.Tensor | float = settings.noise_offset or 0.0
    if settings.noise_offset_random_strength:
        offset = _rand((1,), generator, latents) * offset
    if settings.adaptive_noise_scale is not None:
        latent_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
        offset = torch.clamp(offset + settings.adaptive_noise_scale * latent_mean, min=0.0)
    b, c = latents.shape[:2]
    return noise + offset * _randn((b, c, 1, 1), generator, noise)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Multi-resolution noise: add upsampled coarser noise (factor r^i, r in [2,4)) weighted discount^i, renormalize."""
    b, c, h, w = noise.shape
    out = noise.float().clone()
    for i in range(iterations):
        r = float(_rand((1,), generator, noise).item()) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = _randn((b, c, hn, wn), generator, out)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return (out / out.std()).to(noise.dtype)


def sample_noise_and_timesteps(
    latents: torch.Tensor, scheduler: DDPMScheduler, settings: NoiseSettings | Any,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw noise and timesteps for a batch and noise the latents.

    Returns ``(noise, noisy_latents, timesteps)``: ``noise`` is the training target for epsilon prediction
    (with input perturbation the latents are noised with ``noise + gamma * randn`` but ``noise`` is returned),
    ``timesteps`` is a long tensor [B] uniform in ``[min_timestep, max_timestep)``. ``settings`` is a
    :class:`NoiseSettings` or anything with the option attributes (an argparse namespace).
    """
    if not isinstance(settings, NoiseSettings):
        settings = NoiseSettings.from_args(settings)
    noise = _randn(tuple(latents.shape), generator, latents)
    if settings.noise_offset:
        noise = apply_noise_offset(noise, latents, settings, generator)
    if settings.multires_noise_iterations:
        noise = pyramid_noise(noise, settings.multires_noise_iterations, settings.multires_noise_discount, generator)

    lo, hi = settings.timestep_range(scheduler.config.num_train_timesteps)
    gen_device = generator.device if generator is not None else latents.device
    timesteps = torch.randint(lo, hi, (latents.shape[0],), generator=generator, device=gen_device)
    timesteps = timesteps.to(latents.device)

    noise_in = noise
    if settings.ip_noise_gamma:
        gamma: torch.Tensor | float = settings.ip_noise_gamma
        if settings.ip_noise_gamma_random_strength:
            gamma = _rand((1,), generator, latents) * gamma
        noise_in = noise + gamma * _randn(tuple(latents.shape), generator, latents)
    noisy_latents = scheduler.add_noise(latents, noise_in, timesteps)
    return noise, noisy_latents, timesteps
