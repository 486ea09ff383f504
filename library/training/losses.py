"""Training losses: loss types, huber schedules, SNR-based weightings, masked loss.

Public API (stable, used by ``library.training.loop``):

- ``add_loss_arguments(parser)``: ``--loss_type`` (l2|l1|huber|smooth_l1), ``--huber_schedule``
  (constant|exponential|snr, default snr), ``--huber_c`` (0.1), ``--huber_scale`` (1.0), ``--min_snr_gamma``,
  ``--scale_v_pred_loss_like_noise_pred``, ``--v_pred_like_loss``, ``--debiased_estimation_loss``,
  ``--masked_loss``.
- ``validate_noise_loss_args(args)``: raises one ``UserError`` listing every conflict among the noise and loss
  options (call it before loading models). Reads ``args.v_parameterization`` and ``args.zero_terminal_snr``.
- ``LossSettings.from_args(args)``.
- ``conditional_loss(pred, target, loss_type, huber_c)`` -> elementwise loss.
- ``huber_threshold(timesteps, scheduler, schedule, huber_c, huber_scale)`` -> c per sample [B].
- ``apply_snr_weighting``, ``scale_v_prediction_loss_like_noise_prediction``, ``add_v_prediction_like_loss``,
  ``apply_debiased_estimation``: per-sample weightings of a loss [B].
- ``masked_mean(loss, masks)`` -> per-sample mean over the mask (normalized by mask area).
- ``compute_training_loss(pred, target, timesteps, scheduler, *, settings, loss_weights, masks=None)`` -> scalar.

Differences from sd-scripts: the ``snr`` huber schedule is multiplied by ``--huber_scale`` like the other
schedules (the reference ignores it there); the masked loss is divided by the mask area, so a mask covering
a quarter of the image does not quarter the effective learning rate; SNR weights are read from the scheduler
actually used (correct with ``--zero_terminal_snr``).
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from library.errors import UserError
from library.training.noise import compute_snr, noise_option_problems

logger = logging.getLogger(__name__)

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
SNR_CLIP = 1000.0


def add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the loss options (sd-scripts names and defaults)."""
    g = parser.add_argument_group("loss")
    g.add_argument("--loss_type", type=str, default="l2", choices=LOSS_TYPES, help="loss function (default l2)")
    g.add_argument("--huber_schedule", type=str, default="snr", choices=HUBER_SCHEDULES,
                   help="how the huber/smooth_l1 parameter c changes with the timestep (default snr)")
    g.add_argument("--huber_c", type=float, default=0.1,
                   help="huber parameter c (constant), or its value at the last timestep (exponential/snr)")
    g.add_argument("--huber_scale", type=float, default=1.0, help="multiplier of the huber parameter c")
    g.add_argument("--min_snr_gamma", type=float, default=None,
                   help="min-SNR weighting gamma (5 is the paper's recommendation)")
    g.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true",
                   help="scale the v-prediction loss like noise prediction (needs --v_parameterization)")
    g.add_argument("--v_pred_like_loss", type=float, default=None,
                   help="add a v-prediction-like loss of this weight (epsilon models only)")
    g.add_argument("--debiased_estimation_loss", action="store_true", help="debiased estimation loss weighting")
    g.add_argument("--masked_loss", action="store_true",
                   help="weight the loss by the image's alpha/conditioning mask")


@dataclass(frozen=True)
class LossSettings:
    """Resolved loss options; field names match the command-line options."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    masked_loss: bool = False
    v_parameterization: bool = False

    @classmethod
    def from_args(cls, args: Any) -> "LossSettings":
        """Read the fields from an argparse namespace (missing attributes keep their defaults)."""
        defaults = cls()
        return cls(**{f: getattr(args, f, getattr(defaults, f)) for f in cls.__dataclass_fields__})


def validate_noise_loss_args(args: Any) -> None:
    """Raise one ``UserError`` naming every conflicting or out-of-range noise/loss option."""
    problems = noise_option_problems(args)
    s = LossSettings.from_args(args)
    ztsnr = bool(getattr(args, "zero_terminal_snr", False))
    if s.loss_type not in LOSS_TYPES:
        problems.append(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {s.loss_type!r}")
    if s.huber_schedule not in HUBER_SCHEDULES:
        problems.append(f"--huber_schedule must be one of {', '.join(HUBER_SCHEDULES)}, got {s.huber_schedule!r}")
    if s.loss_type in ("huber", "smooth_l1"):
        if s.huber_schedule in ("exponential", "snr") and not 0 < s.huber_c <= 1:
            problems.append(f"--huber_c must be in (0, 1] with --huber_schedule {s.huber_schedule}, got {s.huber_c}")
        if s.huber_schedule == "constant" and s.huber_c <= 0:
            problems.append(f"--huber_c must be positive, got {s.huber_c}")
        if s.huber_scale <= 0:
            problems.append(f"--huber_scale must be positive, got {s.huber_scale}")
    if s.min_snr_gamma is not None and s.min_snr_gamma <= 0:
        problems.append(f"--min_snr_gamma must be positive, got {s.min_snr_gamma}")
    if s.scale_v_pred_loss_like_noise_pred and not s.v_parameterization:
        problems.append("--scale_v_pred_loss_like_noise_pred only applies to v-prediction models; add "
                        "--v_parameterization or remove it")
    if s.v_pred_like_loss is not None:
        if s.v_parameterization:
            problems.append("--v_pred_like_loss is for epsilon-prediction models; remove it with --v_parameterization")
        elif ztsnr:
            problems.append("--v_pred_like_loss divides by the SNR, which is 0 at the last timestep with "
                            "--zero_terminal_snr; remove one of them")
    if ztsnr and not s.v_parameterization:
        logger.warning("--zero_terminal_snr without --v_parameterization: an epsilon-prediction model cannot learn "
                       "the last timestep (pure noise); zero terminal SNR is meant for v-prediction")
    if s.debiased_estimation_loss and ztsnr and not s.v_parameterization:
        problems.append("--debiased_estimation_loss weights epsilon-prediction by 1/sqrt(SNR), infinite at the "
                        "last timestep with --zero_terminal_snr; use --v_parameterization or drop one of them")
    if problems:
        raise UserError.from_problems("invalid noise/loss options", problems)


def conditional_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | float = 0.1) -> torch.Tensor:
    """Elementwise loss (no reduction). ``huber_c`` is a float or a per-sample tensor [B].

    huber: ``2c(sqrt((p-t)^2 + c^2) - c)``; smooth_l1: ``2(sqrt((p-t)^2 + c^2) - c)``.
    """
    diff = pred - target
    if loss_type == "l2":
        return diff**2
    if loss_type == "l1":
        return diff.abs()
    if loss_type in ("huber", "smooth_l1"):
        if isinstance(huber_c, torch.Tensor):
            huber_c = huber_c.to(diff.device, diff.dtype).view(-1, *([1] * (diff.dim() - 1)))
        root = torch.sqrt(diff**2 + huber_c**2) - huber_c
        return 2 * huber_c * root if loss_type == "huber" else 2 * root
    raise ValueError(f"unknown loss type {loss_type!r}; expected one of {LOSS_TYPES}")


def huber_threshold(timesteps: torch.Tensor, scheduler: DDPMScheduler, schedule: str, huber_c: float,
                    huber_scale: float = 1.0) -> torch.Tensor:
    """Huber parameter c per sample [B].

    constant: ``c * scale``; exponential: ``exp(-a t) * scale`` with ``a = -ln(c) / T``;
    snr: ``((1 - c) / (1 + sigma_t)^2 + c) * scale`` with ``sigma_t = sqrt((1 - alpha_bar) / alpha_bar)``.
    """
    t = timesteps.float()
    if schedule == "constant":
        c = torch.full_like(t, huber_c)
    elif schedule == "exponential":
        alpha = -math.log(huber_c) / scheduler.config.num_train_timesteps
        c = torch.exp(-alpha * t)
    elif schedule == "snr":
        a = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps.long()]
        sigmas = torch.sqrt((1.0 - a) / a)
        c = (1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c
    else:
        raise ValueError(f"unknown huber schedule {schedule!r}; expected one of {HUBER_SCHEDULES}")
    return c * huber_scale


def apply_snr_weighting(loss: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler, gamma: float,
                        v_prediction: bool) -> torch.Tensor:
    """Min-SNR weighting: ``min(snr, gamma) / snr`` (epsilon) or ``min(snr, gamma) / (snr + 1)`` (v).

    At SNR 0 (zero terminal SNR) the epsilon weight takes its limit 1 instead of 0/0.
    """
    snr = compute_snr(scheduler, timesteps).to(loss.device)
    clipped = torch.clamp(snr, max=gamma)
    if v_prediction:
        weight = clipped / (snr + 1)
    else:
        weight = torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    return loss * weight


def _snr_scale(timesteps: torch.Tensor, scheduler: DDPMScheduler, device: torch.device) -> torch.Tensor:
    snr = compute_snr(scheduler, timesteps).to(device).clamp(max=SNR_CLIP)
    return snr / (snr + 1)


def scale_v_prediction_loss_like_noise_prediction(loss: torch.Tensor, timesteps: torch.Tensor,
                                                  scheduler: DDPMScheduler) -> torch.Tensor:
    """``loss * snr / (snr + 1)`` (snr clipped to 1000): a v-loss weighted like an epsilon loss."""
    return loss * _snr_scale(timesteps, scheduler, loss.device)


def add_v_prediction_like_loss(loss: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler,
                               weight: float) -> torch.Tensor:
    """``loss + weight * loss * (snr + 1) / snr`` (snr clipped to 1000), for epsilon models."""
    return loss + loss / _snr_scale(timesteps, scheduler, loss.device) * weight


def apply_debiased_estimation(loss: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler,
                              v_prediction: bool = False) -> torch.Tensor:
    """``loss / sqrt(snr)`` (epsilon) or ``loss / (snr + 1)`` (v), snr clipped to 1000."""
    snr = compute_snr(scheduler, timesteps).to(loss.device).clamp(max=SNR_CLIP)
    weight = 1.0 / (snr + 1) if v_prediction else 1.0 / torch.sqrt(snr)
    return loss * weight


def masked_mean(loss: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of ``loss`` [B,C,h,w] weighted by ``masks`` ([B,H,W] or [B,1,H,W], values in [0,1]).

    Masks are area-resized to the latent size; the result is divided by the mask area, so it is the mean loss
    over the masked region (an all-zero mask gives 0).
    """
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    masks = masks.to(loss.device, torch.float32)
    if masks.shape[-2:] != loss.shape[-2:]:
        masks = F.interpolate(masks, size=loss.shape[-2:], mode="area")
    masks = masks.expand(-1, loss.shape[1], -1, -1)
    dims = tuple(range(1, loss.dim()))
    return (loss * masks).sum(dim=dims) / masks.sum(dim=dims).clamp(min=1e-8)


def compute_training_loss(
    pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler, *,
    settings: LossSettings | Any, loss_weights: torch.Tensor | None = None, masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss of a batch as a scalar.

    Order: elementwise loss (in float32) -> per-sample mean (masked and normalized when ``masks`` is given)
    -> ``loss_weights`` [B] (prior loss weight) -> min-SNR / v-pred scaling / v-pred-like / debiased
    -> batch mean. ``settings`` is a :class:`LossSettings` or an argparse namespace.
    """
    if not isinstance(settings, LossSettings):
        settings = LossSettings.from_args(settings)
    huber_c: torch.Tensor | float = settings.huber_c
    if settings.loss_type in ("huber", "smooth_l1"):
        huber_c = huber_threshold(timesteps, scheduler, settings.huber_schedule, settings.huber_c,
                                  settings.huber_scale)
    loss = conditional_loss(pred.float(), target.float(), settings.loss_type, huber_c)
    if masks is not None:
        loss = masked_mean(loss, masks)
    else:
        loss = loss.mean(dim=tuple(range(1, loss.dim())))
    if loss_weights is not None:
        loss = loss * loss_weights.to(loss.device, loss.dtype)
    if settings.min_snr_gamma:
        loss = apply_snr_weighting(loss, timesteps, scheduler, settings.min_snr_gamma, settings.v_parameterization)
    if settings.scale_v_pred_loss_like_noise_pred:
        loss = scale_v_prediction_loss_like_noise_prediction(loss, timesteps, scheduler)
    if settings.v_pred_like_loss:
        loss = add_v_prediction_like_loss(loss, timesteps, scheduler, settings.v_pred_like_loss)
    if settings.debiased_estimation_loss:
        loss = apply_debiased_estimation(loss, timesteps, scheduler, settings.v_parameterization)
    return loss.mean()
