"""Exponential moving average of trained weights (fine-tuning, DreamBooth, LoRA).

Public API (stable):

- ``add_ema_arguments(parser)``: ``--ema_decay`` (fixed decay, e.g. 0.9999), ``--ema_sigma_rel`` (power-function
  EMA, e.g. 0.05-0.2; mutually exclusive with ``--ema_decay``), ``--ema_cpu`` (keep the average in CPU memory).
  EMA is on when one of the first two is given.
- ``validate_ema_args(args)``, ``ema_from_args(params, args) -> WeightEMA | None``.
- ``sigma_rel_to_gamma(sigma_rel)``, ``power_ema_beta(step, gamma)``: Karras et al., "Analyzing and Improving the
  Training Dynamics of Diffusion Models" (arXiv 2312.02696), section 3: the power-function EMA has
  ``beta_t = (1 - 1/t)^(gamma + 1)`` and a relative width ``sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3)))``;
  ``gamma`` is the largest real root of ``gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0`` with
  ``s = sigma_rel^-2``. Its average does not depend on the initial weights and keeps a fixed relative width as
  training gets longer.
- ``WeightEMA(params, *, decay=None, sigma_rel=None, device=None)``: ``update(step)`` after each optimizer step,
  where ``step`` (>= 1) counts optimizer steps from the start of training (so a resumed run continues the
  same schedule); ``copy_to(params=None)``; ``store()`` / ``restore()`` or ``with ema.average_parameters():``
  to save or sample with the averaged weights; ``state_dict()`` / ``load_state_dict()`` for resume.

With a fixed decay the average starts from the weights given to the constructor; the power-function EMA
starts from the weights after the first update (``beta_1 = 0``).
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from library.errors import UserError


def add_ema_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the EMA options."""
    g = parser.add_argument_group("EMA")
    g.add_argument("--ema_decay", type=float, default=None,
                   help="keep an exponential moving average of the trained weights with this fixed decay (0.9999)")
    g.add_argument("--ema_sigma_rel", type=float, default=None,
                   help="power-function EMA with this relative width (Karras et al. 2312.02696), e.g. 0.05-0.2")
    g.add_argument("--ema_cpu", action="store_true", help="keep the EMA weights in CPU memory")


def validate_ema_args(args: Any) -> None:
    """Raise ``UserError`` for conflicting or out-of-range EMA options."""
    decay = getattr(args, "ema_decay", None)
    sigma_rel = getattr(args, "ema_sigma_rel", None)
    if decay is not None and sigma_rel is not None:
        raise UserError("--ema_decay and --ema_sigma_rel are two kinds of EMA; give only one")
    if decay is not None and not 0.0 <= decay < 1.0:
        raise UserError(f"--ema_decay must be in [0, 1), e.g. 0.9999; got {decay}")
    if sigma_rel is not None and not 0.0 < sigma_rel < 0.3:
        raise UserError(f"--ema_sigma_rel must be between 0 and 0.3 (0.05-0.2 is typical); got {sigma_rel}")
    if getattr(args, "ema_cpu", False) and decay is None and sigma_rel is None:
        raise UserError("--ema_cpu needs --ema_decay or --ema_sigma_rel")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function exponent gamma for a relative width ``sigma_rel`` (0 < sigma_rel < 0.3, the widest)."""
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    real = roots[np.abs(roots.imag) < 1e-9].real
    return float(real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    return float(((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5)


def power_ema_beta(step: int, gamma: float) -> float:
    """``(1 - 1/step)^(gamma + 1)``: the decay of the power-function EMA at update ``step`` (1-based)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


class WeightEMA:
    """Moving average of a list of parameters, kept in float32 (on ``device``, default: each parameter's)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], *, decay: float | None = None,
                 sigma_rel: float | None = None, device: torch.device | str | None = None):
        if (decay is None) == (sigma_rel is None):
            raise ValueError("give exactly one of decay and sigma_rel")
        self.params = [p for p in params]
        self.decay = decay
        self.sigma_rel = sigma_rel
        self.gamma = sigma_rel_to_gamma(sigma_rel) if sigma_rel is not None else None
        self.device = torch.device(device) if device is not None else None
        self.last_step = 0
        self.shadow = [p.detach().to(self.device or p.device, torch.float32, copy=True) for p in self.params]
        self._backup: list[torch.Tensor] | None = None

    def beta(self, step: int) -> float:
        """The decay used by ``update(step)``."""
        return self.decay if self.gamma is None else power_ema_beta(step, self.gamma)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current parameter values in: ``ema = beta * ema + (1 - beta) * param``."""
        if step <= self.last_step:
            raise ValueError(f"EMA update steps must increase: got {step} after {self.last_step}")
        weight = 1.0 - self.beta(step)
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().to(s.device, torch.float32), weight)
        self.last_step = step

    @torch.no_grad()
    def copy_to(self, params: Iterable[torch.nn.Parameter] | None = None) -> None:
        """Write the averaged weights into ``params`` (default: the tracked parameters)."""
        targets = self.params if params is None else list(params)
        if len(targets) != len(self.shadow):
            raise ValueError(f"expected {len(self.shadow)} parameters, got {len(targets)}")
        for s, p in zip(self.shadow, targets):
            p.copy_(s.to(p.device, p.dtype))

    @torch.no_grad()
    def store(self) -> None:
        """Remember the current (raw) weights so ``restore()`` can put them back."""
        self._backup = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def restore(self) -> None:
        if self._backup is None:
            raise RuntimeError("restore() without store()")
        for b, p in zip(self._backup, self.params):
            p.copy_(b)
        self._backup = None

    @contextmanager
    def average_parameters(self) -> Iterator[None]:
        """Within the block the tracked parameters hold the averaged weights (for saving or sampling)."""
        self.store()
        self.copy_to()
        try:
            yield
        finally:
            self.restore()

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "sigma_rel": self.sigma_rel, "last_step": self.last_step,
                "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume; the kind of EMA and the parameter shapes must match this run's."""
        if state.get("decay") != self.decay or state.get("sigma_rel") != self.sigma_rel:
            raise UserError(f"the saved EMA state uses decay={state.get('decay')} sigma_rel={state.get('sigma_rel')}"
                            f", this run decay={self.decay} sigma_rel={self.sigma_rel}; use the same EMA options "
                            "to resume")
        shadow = state["shadow"]
        shapes = [tuple(s.shape) for s in shadow]
        if shapes != [tuple(s.shape) for s in self.shadow]:
            raise UserError(f"the saved EMA state has {len(shadow)} tensors that do not match the {len(self.shadow)}"
                            " trained parameters of this run; resume with the same network settings")
        for s, saved in zip(self.shadow, shadow):
            s.copy_(saved.to(s.device, s.dtype))
        self.last_step = int(state["last_step"])


def ema_from_args(params: Iterable[torch.nn.Parameter], args: Any) -> WeightEMA | None:
    """A :class:`WeightEMA` configured by the options, or None when EMA is off."""
    validate_ema_args(args)
    decay = getattr(args, "ema_decay", None)
    sigma_rel = getattr(args, "ema_sigma_rel", None)
    if decay is None and sigma_rel is None:
        return None
    device = "cpu" if getattr(args, "ema_cpu", False) else None
    return WeightEMA(params, decay=decay, sigma_rel=sigma_rel, device=device)
