"""EMA math: fixed decay and power-function EMA against closed forms, storage, swap and resume."""

from __future__ import annotations

import argparse

import pytest
import torch

from library.errors import UserError
from library.training.ema import (
    WeightEMA, add_ema_arguments, ema_from_args, gamma_to_sigma_rel, power_ema_beta, sigma_rel_to_gamma,
    validate_ema_args,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_ema_arguments(parser)
    return parser.parse_args(list(argv))


def run_sequence(ema: WeightEMA, param: torch.nn.Parameter, values: list[float], first_step: int = 1) -> None:
    for i, v in enumerate(values):
        with torch.no_grad():
            param.fill_(v)
        ema.update(first_step + i)


def test_sigma_rel_gamma_relation():
    # paper values: sigma_rel 0.05 -> gamma 16.97, 0.10 -> 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.02, 0.15, 0.25, 0.29):
        g = sigma_rel_to_gamma(s)
        assert gamma_to_sigma_rel(g) == pytest.approx(s, rel=1e-9) and g > -0.39
    assert power_ema_beta(1, 6.94) == 0.0 and power_ema_beta(10, 1.0) == pytest.approx(0.9**2)


def test_fixed_decay_closed_form():
    param = torch.nn.Parameter(torch.full((3,), 2.0))
    ema = WeightEMA([param], decay=0.9)
    values = [float(k) for k in range(1, 21)]
    run_sequence(ema, param, values)
    n = len(values)
    expected = 0.9**n * 2.0 + sum(0.1 * 0.9 ** (n - k) * v for k, v in enumerate(values, 1))
    assert torch.allclose(ema.shadow[0].double(), torch.full((3,), expected, dtype=torch.float64), rtol=1e-6)
    assert param[0].item() == 20.0  # raw weights untouched


def test_power_ema_weights_follow_t_gamma():
    param = torch.nn.Parameter(torch.zeros(1))
    ema = WeightEMA([param], sigma_rel=0.1)
    gamma = ema.gamma
    n = 400
    values = [float((k * 7919) % 13) for k in range(1, n + 1)]  # any known sequence
    run_sequence(ema, param, values)
    betas = [power_ema_beta(t, gamma) for t in range(1, n + 1)]
    weights = []
    for k in range(1, n + 1):
        w = 1 - betas[k - 1]
        for j in range(k + 1, n + 1):
            w *= betas[j - 1]
        weights.append(w)
    assert sum(weights) == pytest.approx(1.0)  # beta_1 = 0: the initial value has no weight
    expected = sum(w * v for w, v in zip(weights, values))
    assert ema.shadow[0].item() == pytest.approx(expected, rel=1e-5)
    # the profile is approximately proportional to t^gamma (the paper's power function)
    profile = [k**gamma for k in range(1, n + 1)]
    total = sum(profile)
    approx = sum(p / total * v for p, v in zip(profile, values))
    assert ema.shadow[0].item() == pytest.approx(approx, rel=0.02)


def test_power_ema_ignores_initial_weights():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.full((2,), 100.0))
    ea, eb = WeightEMA([a], sigma_rel=0.2), WeightEMA([b], sigma_rel=0.2)
    run_sequence(ea, a, [1.0, 2.0, 3.0])
    run_sequence(eb, b, [1.0, 2.0, 3.0])
    assert torch.allclose(ea.shadow[0], eb.shadow[0])


def test_cpu_storage_swap_and_copy():
    net = torch.nn.Linear(3, 2).to(torch.bfloat16)
    ema = WeightEMA(net.parameters(), decay=0.5, device="cpu")
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" for s in ema.shadow)
    raw0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(1)
    raw = net.weight.detach().clone()
    with ema.average_parameters():
        assert torch.allclose(net.weight.float(), (raw0.float() + raw.float()) / 2, atol=1e-2)
    assert torch.equal(net.weight, raw)
    other = torch.nn.Linear(3, 2)
    ema.copy_to(other.parameters())
    assert torch.allclose(other.weight, ema.shadow[0])
    with pytest.raises(ValueError):
        ema.update(1)


def test_resume_continues_identically():
    p1 = torch.nn.Parameter(torch.zeros(4))
    full = WeightEMA([p1], sigma_rel=0.15)
    run_sequence(full, p1, [1.0, 5.0, 2.0, 8.0, 3.0, 4.0])
    p2 = torch.nn.Parameter(torch.zeros(4))
    first = WeightEMA([p2], sigma_rel=0.15)
    run_sequence(first, p2, [1.0, 5.0, 2.0])
    state = first.state_dict()
    p3 = torch.nn.Parameter(torch.full((4,), 3.0))
    resumed = WeightEMA([p3], sigma_rel=0.15)
    resumed.load_state_dict(state)
    run_sequence(resumed, p3, [8.0, 3.0, 4.0], first_step=4)
    assert torch.allclose(resumed.shadow[0], full.shadow[0]) and resumed.last_step == 6
    with pytest.raises(UserError, match="same EMA options"):
        WeightEMA([p3], decay=0.9).load_state_dict(state)
    with pytest.raises(UserError, match="do not match"):
        WeightEMA([torch.nn.Parameter(torch.zeros(5))], sigma_rel=0.15).load_state_dict(state)


def test_options():
    assert ema_from_args([], parse()) is None
    ema = ema_from_args([torch.nn.Parameter(torch.zeros(1))], parse("--ema_sigma_rel", "0.1", "--ema_cpu"))
    assert ema.gamma == pytest.approx(6.937, abs=1e-3) and ema.device == torch.device("cpu")
    assert ema_from_args([], parse("--ema_decay", "0.999")).decay == 0.999
    for argv, fragment in ((["--ema_decay", "0.9", "--ema_sigma_rel", "0.1"], "only one"),
                           (["--ema_decay", "1.5"], "--ema_decay"), (["--ema_sigma_rel", "0.4"], "--ema_sigma_rel"),
                           (["--ema_cpu"], "--ema_cpu")):
        with pytest.raises(UserError, match=fragment):
            validate_ema_args(parse(*argv))
