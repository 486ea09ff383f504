"""The rectified-flow (flow matching) training objective, shared by FLUX.1, SD3 and Lumina.

Conventions (sd-scripts' FLUX ones): ``sigma`` in (0, 1] is the noise level, the noisy input is
``x_t = (1 - sigma) * x0 + sigma * noise``, the velocity target is ``noise - x0``, and the model is given
``timesteps = sigma * 1000`` (FLUX divides it by 1000 again).

Options (sd-scripts names): ``--timestep_sampling sigma|uniform|sigmoid|shift|flux_shift|nextdit_shift``,
``--sigmoid_scale``, ``--discrete_flow_shift``, ``--model_prediction_type raw|additive|sigma_scaled``,
``--weighting_scheme`` (``sigma_sqrt|logit_normal|mode|cosmap|none|uniform``) with ``--logit_mean``, ``--logit_std``,
``--mode_scale``.

SD3 (``sd3_train_network.py``) has no ``--timestep_sampling``: its scripts set ``timestep_sampling="sd3"`` and
``model_prediction_type="sigma_scaled"`` (:func:`add_sd3_flow_arguments`). ``u`` is drawn from the
``--weighting_scheme`` density, shifted by ``--training_shift``, mapped to an integer timestep in
``[--min_timestep, --max_timestep)`` and ``sigma = t / 1000``, bit-identical to sd-scripts' SD3 draw; the loss
compares ``x_t - sigma * output`` with the latents, weighted by ``--weighting_scheme`` (sigma_sqrt, cosmap).
A draw of ``t = 0`` (sigma 0, where that x0 estimate is exact) gets weight 0 instead of sd-scripts' ``inf * 0``.

Differences from sd-scripts:

- ``sigma_scaled`` turns the output into an x0 estimate ``x_t - sigma * out`` and compares it with the clean
  latents ``x0``, so the loss is ``sigma^2 * |out - (noise - x0)|^2`` times the ``--weighting_scheme`` weight
  (``sigma_sqrt`` gives back the plain velocity loss). sd-scripts compares that x0 estimate with the velocity
  target, so a perfect velocity predictor scores a large loss and training pulls the output away from a
  velocity; the sampler, which treats the output as a velocity, then denoises wrongly.
- The huber ``snr`` schedule works here, with ``sigma / (1 - sigma)`` (the noise-to-signal ratio of ``x_t``)
  in place of the DDPM ``sqrt((1 - alpha_bar) / alpha_bar)``; sd-scripts raises NotImplementedError.
- SD-only options (``--min_snr_gamma``, ``--v_parameterization``, ``--zero_terminal_snr``, …) are refused
  with a message instead of being silently ignored.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

import torch

from library.training.losses import LossSettings, conditional_loss, masked_mean
from library.training.noise import NoiseSettings, apply_noise_offset, pyramid_noise

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift", "nextdit_shift")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")
SD3_SAMPLING = "sd3"  # set by the SD3 scripts, not a --timestep_sampling choice
_SAMPLINGS = TIMESTEP_SAMPLINGS + (SD3_SAMPLING,)

# Options of the DDPM objective that have no meaning for flow matching, with the reason given to the user.
_SD_ONLY_OPTIONS = {
    "v_parameterization": "the model predicts a velocity by construction",
    "zero_terminal_snr": "the flow schedule already reaches pure noise at sigma = 1",
    "min_snr_gamma": "use --weighting_scheme with --model_prediction_type sigma_scaled instead",
    "scale_v_pred_loss_like_noise_pred": "it is defined for the DDPM v-prediction objective",
    "v_pred_like_loss": "it is defined for the DDPM epsilon objective",
    "debiased_estimation_loss": "it is defined for the DDPM epsilon objective",
    "min_timestep": "sigma is drawn by --timestep_sampling",
    "max_timestep": "sigma is drawn by --timestep_sampling",
}


@dataclass(frozen=True)
class FlowDefaults:
    """A family's defaults for the options (FLUX: sigma sampling, shift 3.0)."""

    timestep_sampling: str = "sigma"
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "raw"


def add_weighting_arguments(parser: argparse.ArgumentParser) -> None:
    """``--weighting_scheme`` and its parameters (sd-scripts' DiT option group)."""
    g = parser.add_argument_group("flow-matching weighting")
    g.add_argument("--weighting_scheme", default="uniform", choices=WEIGHTING_SCHEMES,
                   help="density of sigma for --timestep_sampling sigma, and loss weight for sigma_scaled "
                        "(default uniform)")
    g.add_argument("--logit_mean", type=float, default=0.0, help="mean of logit_normal (default 0.0)")
    g.add_argument("--logit_std", type=float, default=1.0, help="std of logit_normal (default 1.0)")
    g.add_argument("--mode_scale", type=float, default=1.29, help="scale of the 'mode' density (default 1.29)")


def add_flow_matching_arguments(parser: argparse.ArgumentParser, defaults: FlowDefaults = FlowDefaults()) -> None:
    """The flow-matching options with a family's defaults, plus the weighting group."""
    g = parser.add_argument_group("flow matching")
    g.add_argument("--timestep_sampling", default=defaults.timestep_sampling, choices=TIMESTEP_SAMPLINGS,
                   help=f"how sigma is drawn (default {defaults.timestep_sampling})")
    g.add_argument("--sigmoid_scale", type=float, default=1.0,
                   help="scale of the normal draw for sigmoid/shift/flux_shift (default 1.0)")
    g.add_argument("--discrete_flow_shift", type=float, default=defaults.discrete_flow_shift,
                   help=f"shift of the schedule for 'sigma' and 'shift' (default {defaults.discrete_flow_shift})")
    g.add_argument("--model_prediction_type", default=defaults.model_prediction_type, choices=MODEL_PREDICTION_TYPES,
                   help="raw: output is the velocity; additive: output + x_t; sigma_scaled: x0 estimate "
                        f"x_t - sigma*output compared with the latents (default {defaults.model_prediction_type})")
    add_weighting_arguments(parser)


def add_sd3_flow_arguments(parser: argparse.ArgumentParser) -> None:
    """SD3's objective options: ``--training_shift`` and the weighting group (``--min_timestep`` and
    ``--max_timestep`` come from the loop's options and bound the integer timesteps)."""
    g = parser.add_argument_group("SD3 flow matching")
    g.add_argument("--training_shift", type=float, default=1.0,
                   help="shift of the timestep distribution drawn from --weighting_scheme, u*s/(1+(s-1)u); "
                        "above 1 favours noisier steps (default 1.0)")
    add_weighting_arguments(parser)
    parser.set_defaults(timestep_sampling=SD3_SAMPLING, model_prediction_type="sigma_scaled")


@dataclass(frozen=True)
class FlowMatchingSettings:
    """Resolved flow-matching options; field names match the command-line options."""

    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "raw"
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    training_shift: float = 1.0  # SD3
    min_timestep: int | None = None  # SD3: integer timesteps in [min, max)
    max_timestep: int | None = None

    @classmethod
    def from_args(cls, args: Any) -> "FlowMatchingSettings":
        """Read the fields from an argparse namespace (missing attributes keep their defaults)."""
        defaults = cls()
        return cls(**{f: getattr(args, f, getattr(defaults, f)) for f in cls.__dataclass_fields__})


def flow_option_problems(args: Any) -> list[str]:
    """Every problem with the flow-matching options and with SD options that do not apply to them."""
    s = FlowMatchingSettings.from_args(args)
    problems = []
    if s.timestep_sampling not in _SAMPLINGS:
        problems.append(f"--timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, "
                        f"got {s.timestep_sampling!r}")
    if s.model_prediction_type not in MODEL_PREDICTION_TYPES:
        problems.append(f"--model_prediction_type must be one of {', '.join(MODEL_PREDICTION_TYPES)}, "
                        f"got {s.model_prediction_type!r}")
    if s.weighting_scheme not in WEIGHTING_SCHEMES:
        problems.append(f"--weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)}, got {s.weighting_scheme!r}")
    if s.sigmoid_scale <= 0:
        problems.append(f"--sigmoid_scale must be positive, got {s.sigmoid_scale}")
    if s.discrete_flow_shift <= 0:
        problems.append(f"--discrete_flow_shift must be positive, got {s.discrete_flow_shift}")
    if s.logit_std <= 0:
        problems.append(f"--logit_std must be positive, got {s.logit_std}")
    if s.timestep_sampling == SD3_SAMPLING:
        problems += _sd3_problems(s)
    for name, why in _SD_ONLY_OPTIONS.items():
        if s.timestep_sampling == SD3_SAMPLING and name in ("min_timestep", "max_timestep"):
            continue
        value = getattr(args, name, None)
        if value not in (None, False):
            problems.append(f"--{name} does not apply to flow-matching training ({why}); remove it")
    return problems


def _sd3_problems(s: FlowMatchingSettings) -> list[str]:
    problems = []
    if s.training_shift <= 0:
        problems.append(f"--training_shift must be positive, got {s.training_shift}")
    low, high = _timestep_range(s)
    if not 0 <= low < high <= NUM_TRAIN_TIMESTEPS:
        problems.append(f"--min_timestep {low} / --max_timestep {high}: need 0 <= min < max <= "
                        f"{NUM_TRAIN_TIMESTEPS}")
    return problems


def _timestep_range(s: FlowMatchingSettings) -> tuple[int, int]:
    low = 0 if s.min_timestep is None else int(s.min_timestep)
    return low, NUM_TRAIN_TIMESTEPS if s.max_timestep is None else int(s.max_timestep)


def _draw(kind: str, n: int, generator: torch.Generator | None, device: torch.device | None) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    fn = torch.randn if kind == "normal" else torch.rand
    return fn((n,), generator=generator, device=gen_device, dtype=torch.float32)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3 resolution shift ``shift * s / (1 + (shift - 1) * s)``."""
    return sigmas * shift / (1 + (shift - 1) * sigmas)


def flux_time_shift(sigmas: torch.Tensor, image_seq_len: int) -> torch.Tensor:
    """FLUX's shift: ``e^mu / (e^mu + 1/s - 1)`` with ``mu`` linear in the sequence length (256 -> 0.5,
    4096 -> 1.15), as the FLUX sampler uses."""
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (image_seq_len - 256)
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def sample_density(settings: FlowMatchingSettings, n: int, generator: torch.Generator | None = None,
                   device: torch.device | None = None) -> torch.Tensor:
    """``u`` in [0, 1) from the ``--weighting_scheme`` density (logit_normal, mode, else uniform)."""
    if settings.weighting_scheme == "logit_normal":
        return torch.sigmoid(_draw("normal", n, generator, device) * settings.logit_std + settings.logit_mean)
    u = _draw("uniform", n, generator, device)
    if settings.weighting_scheme == "mode":
        u = 1 - u - settings.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def discrete_sigmas(shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The shifted training schedule, from sigma 1 down to 1/T (FlowMatchEulerDiscreteScheduler's table)."""
    s = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32) / num_train_timesteps
    return shift_sigmas(s, shift)


def sample_sigmas(settings: FlowMatchingSettings, batch_size: int, latent_hw: tuple[int, int],
                  generator: torch.Generator | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Noise levels [B] (float32, on ``device``) drawn by ``--timestep_sampling``.

    ``latent_hw`` is the unpacked latent size; ``flux_shift`` and ``nextdit_shift`` use its 2x2-patch sequence
    length.
    """
    mode = settings.timestep_sampling
    if mode == "uniform":
        sigmas = _draw("uniform", batch_size, generator, device)
    elif mode == "nextdit_shift":  # Lumina: a uniform draw with FLUX's resolution shift (sd-scripts' clamp)
        sigmas = _draw("uniform", batch_size, generator, device).clamp(min=1e-7)
        sigmas = flux_time_shift(sigmas, (latent_hw[0] // 2) * (latent_hw[1] // 2))
    elif mode in ("sigmoid", "shift", "flux_shift"):
        sigmas = torch.sigmoid(settings.sigmoid_scale * _draw("normal", batch_size, generator, device))
        if mode == "shift":
            sigmas = shift_sigmas(sigmas, settings.discrete_flow_shift)
        elif mode == "flux_shift":
            sigmas = flux_time_shift(sigmas, (latent_hw[0] // 2) * (latent_hw[1] // 2))
    elif mode == SD3_SAMPLING:
        u = shift_sigmas(sample_density(settings, batch_size, generator, device), settings.training_shift)
        low, high = _timestep_range(settings)
        sigmas = (u * (high - low) + low).long().float() / NUM_TRAIN_TIMESTEPS
    elif mode == "sigma":
        u = sample_density(settings, batch_size, generator, device)
        index = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        sigmas = discrete_sigmas(settings.discrete_flow_shift).to(u.device)[index]
    else:
        raise ValueError(f"unknown timestep sampling {mode!r}; expected one of {_SAMPLINGS}")
    return sigmas.to(device) if device is not None else sigmas


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight: ``sigma^-2`` (sigma_sqrt; 0 at sigma 0, where the x0 loss is 0 anyway),
    ``2 / (pi (1 - 2s + 2s^2))`` (cosmap), else 1."""
    if scheme == "sigma_sqrt":
        s = sigmas.float()
        return torch.where(s > 0, s.clamp(min=torch.finfo(s.dtype).tiny) ** -2.0, torch.zeros_like(s))
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


@dataclass
class FlowBatch:
    """One batch's draw: the noise, the noisy input, sigma [B] and the model's timesteps ``sigma * 1000``."""

    noise: torch.Tensor
    noisy: torch.Tensor
    sigmas: torch.Tensor

    @property
    def timesteps(self) -> torch.Tensor:
        return self.sigmas * NUM_TRAIN_TIMESTEPS


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def make_flow_batch(latents: torch.Tensor, settings: FlowMatchingSettings, noise_settings: NoiseSettings | None = None,
                    generator: torch.Generator | None = None) -> FlowBatch:
    """Draw noise (with --noise_offset / multires noise when set) and sigmas, and build ``x_t``.

    With ``--ip_noise_gamma`` the input is noised with ``noise + gamma * xi`` while ``noise`` (and so the
    target) stays plain, as for SD. Draw order: noise, sigmas, input-perturbation noise (sd-scripts' order).
    """
    ns = noise_settings or NoiseSettings()
    gen_device = generator.device if generator is not None else latents.device
    noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=torch.float32)
    noise = noise.to(latents.device)
    if ns.noise_offset:
        noise = apply_noise_offset(noise, latents, ns, generator)
    if ns.multires_noise_iterations:
        noise = pyramid_noise(noise, ns.multires_noise_iterations, ns.multires_noise_discount, generator)
    sigmas = sample_sigmas(settings, latents.shape[0], tuple(latents.shape[-2:]), generator, latents.device)
    noise_in = noise
    if ns.ip_noise_gamma:
        gamma: torch.Tensor | float = ns.ip_noise_gamma
        if ns.ip_noise_gamma_random_strength:
            gamma = _draw("uniform", 1, generator, latents.device).to(latents.device) * gamma
        xi = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=torch.float32)
        noise_in = noise + gamma * xi.to(latents.device)
    s = _expand(sigmas, latents)
    noisy = ((1 - s) * latents.float() + s * noise_in).to(latents.dtype)
    return FlowBatch(noise=noise.to(latents.dtype), noisy=noisy, sigmas=sigmas)


def prediction_and_target(model_pred: torch.Tensor, latents: torch.Tensor, batch: FlowBatch,
                          settings: FlowMatchingSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(prediction, target, weighting or None)`` for ``--model_prediction_type``.

    raw: the output against ``noise - x0``; additive: ``output + x_t`` against ``noise - x0`` (sd-scripts);
    sigma_scaled: ``x_t - sigma * output`` against ``x0``, weighted by ``--weighting_scheme``.
    """
    mode = settings.model_prediction_type
    velocity = batch.noise - latents
    if mode == "raw":
        return model_pred, velocity, None
    if mode == "additive":
        return model_pred + batch.noisy, velocity, None
    if mode == "sigma_scaled":
        s = _expand(batch.sigmas, model_pred).to(model_pred.dtype)
        x0_estimate = batch.noisy - s * model_pred
        return x0_estimate, latents, loss_weighting(settings.weighting_scheme, batch.sigmas)
    raise ValueError(f"unknown model prediction type {mode!r}; expected one of {MODEL_PREDICTION_TYPES}")


def flow_huber_threshold(sigmas: torch.Tensor, schedule: str, huber_c: float, huber_scale: float = 1.0) -> torch.Tensor:
    """Huber c per sample: constant ``c``; exponential ``exp(-a * 1000 sigma)`` with ``a = -ln(c) / 1000``;
    snr ``(1 - c) / (1 + sigma / (1 - sigma))^2 + c``; each times ``huber_scale``."""
    s = sigmas.float()
    if schedule == "constant":
        c = torch.full_like(s, huber_c)
    elif schedule == "exponential":
        c = torch.exp(math.log(huber_c) * s)
    elif schedule == "snr":
        ratio = s / (1 - s).clamp(min=1e-6)
        c = (1.0 - huber_c) / (1.0 + ratio) ** 2 + huber_c
    else:
        raise ValueError(f"unknown huber schedule {schedule!r}")
    return c * huber_scale


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, *,
                       settings: LossSettings | Any, weighting: torch.Tensor | None = None,
                       loss_weights: torch.Tensor | None = None, masks: torch.Tensor | None = None) -> torch.Tensor:
    """The batch loss as a scalar: elementwise loss (float32) -> per-sample mean (masked when ``masks`` is
    given) -> ``weighting`` [B] (from ``prediction_and_target``) -> ``loss_weights`` [B] -> batch mean."""
    if not isinstance(settings, LossSettings):
        settings = LossSettings.from_args(settings)
    huber_c: torch.Tensor | float = settings.huber_c
    if settings.loss_type in ("huber", "smooth_l1"):
        huber_c = flow_huber_threshold(sigmas, settings.huber_schedule, settings.huber_c, settings.huber_scale)
    loss = conditional_loss(pred.float(), target.float(), settings.loss_type, huber_c)
    loss = masked_mean(loss, masks) if masks is not None else loss.mean(dim=tuple(range(1, loss.dim())))
    if weighting is not None:
        loss = loss * weighting.to(loss.device, loss.dtype).view(-1)
    if loss_weights is not None:
        loss = loss * loss_weights.to(loss.device, loss.dtype)
    return loss.mean()
