"""lora_post_hoc_ema.py: weights against independent closed forms, dtypes, metadata and every error."""

from __future__ import annotations

import hashlib
import math
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_post_hoc_ema
from library.errors import UserError
from library.tools import post_hoc_ema as ema


def gamma_by_bisection(sigma_rel: float) -> float:
    """Solve sigma_rel = sqrt(g+1) / ((g+2) sqrt(g+3)) for g >= 0 (the function decreases in g)."""
    f = lambda g: math.sqrt(g + 1) / ((g + 2) * math.sqrt(g + 3)) - sigma_rel  # noqa: E731
    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def constant_beta_weights(betas: list[float]) -> list[float]:
    n = len(betas) + 1
    weights = [math.prod(betas)]
    for k in range(1, n):
        weights.append((1 - betas[k - 1]) * math.prod(betas[k:]))
    return weights


@pytest.mark.parametrize("sigma_rel", [0.05, 0.15, 0.2, 0.25, 0.28])
def test_gamma_matches_the_paper_relation(sigma_rel):
    assert ema.sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma_by_bisection(sigma_rel), rel=1e-9)


def test_known_gamma_value():
    assert ema.sigma_rel_to_gamma(0.2) == pytest.approx(1.826214, abs=1e-6)


@pytest.mark.parametrize("n", [2, 5, 10])
@pytest.mark.parametrize("sigma_rel", [0.15, 0.2, 0.25])
def test_power_function_weights_closed_form(n, sigma_rel):
    g = gamma_by_bisection(sigma_rel)
    expected = [((k + 1) ** (g + 1) - k ** (g + 1)) / n ** (g + 1) for k in range(n)]
    weights = ema.effective_weights(ema.merge_betas(n, sigma_rel=sigma_rel))
    assert weights == pytest.approx(expected, abs=1e-12)
    assert all(w > 0 for w in weights), "every checkpoint takes part"
    assert sum(weights) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "beta,beta2,n,betas",
    [
        (0.95, None, 5, [0.95] * 4),
        (0.9, 0.95, 5, [0.9, 0.9 + 0.05 / 3, 0.9 + 0.1 / 3, 0.95]),
        (0.8, 0.5, 3, [0.8, 0.5]),
        (0.9, 0.95, 2, [0.9]),
    ],
)
def test_beta_schedule_and_weights(beta, beta2, n, betas):
    got = ema.merge_betas(n, beta, beta2)
    assert got == pytest.approx(betas)
    assert ema.effective_weights(got) == pytest.approx(constant_beta_weights(betas))


def test_documented_example_weights():
    # 5 checkpoints, beta 0.95: the oldest keeps 0.95^4
    weights = ema.effective_weights(ema.merge_betas(5, 0.95))
    assert weights == pytest.approx([0.814506, 0.042869, 0.045125, 0.0475, 0.05], abs=1e-6)


@pytest.mark.parametrize("bad", [0.2887, 0.3, 0.5, 0.0, -0.1])
def test_unreachable_sigma_rel_is_refused_with_the_range(bad):
    with pytest.raises(UserError, match=r"0 < sigma_rel < 0\.2887"):
        ema.merge_betas(4, sigma_rel=bad)


def write_checkpoints(folder: Path, n: int, *, dtype=torch.bfloat16, alpha=4.0) -> list[Path]:
    paths = []
    for k in range(n):
        torch.manual_seed(k)
        tensors = {
            "lora_unet_x.lora_down.weight": torch.randn(4, 8).to(dtype),
            "lora_unet_x.lora_up.weight": torch.randn(8, 4, dtype=torch.float16),
            "lora_unet_x.alpha": torch.tensor(alpha),
            "step_counter": torch.tensor([k], dtype=torch.int64),
        }
        path = folder / f"ckpt-{k:02d}.safetensors"
        save_file(tensors, str(path), metadata={"ss_epoch": str(k + 1), "ss_network_dim": "4", "other": "x"})
        os.utime(path, (1_000_000 + k * 10, 1_000_000 + k * 10))
        paths.append(path)
    return paths


def sha256_after_header(data: bytes) -> str:
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n :]).hexdigest()


@pytest.mark.parametrize("args", [["--beta", "0.9"], ["--beta", "0.8", "--beta2", "0.95"], ["--sigma_rel", "0.2"]])
def test_merge_tensors_dtypes_and_metadata(tmp_path, args, capsys):
    paths = write_checkpoints(tmp_path, 4)
    out = tmp_path / "ema.safetensors"
    # give the files in reverse order: sorting by mtime must restore oldest-first
    assert lora_post_hoc_ema.main([str(p) for p in reversed(paths)] + args + ["--output_file", str(out)]) == 0

    opts = dict(zip(args[::2], args[1::2]))
    betas = ema.merge_betas(
        4, float(opts.get("--beta", 0.95)), float(opts["--beta2"]) if "--beta2" in opts else None,
        float(opts["--sigma_rel"]) if "--sigma_rel" in opts else None,
    )
    weights = ema.effective_weights(betas)
    inputs = [load_file(str(p)) for p in paths]
    merged = load_file(str(out))
    for key in ("lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight"):
        expected = sum(w * t[key].double() for w, t in zip(weights, inputs))
        assert merged[key].dtype == inputs[0][key].dtype
        assert torch.allclose(merged[key].double(), expected.to(inputs[0][key].dtype).double(), atol=1e-2, rtol=1e-2)
    assert torch.equal(merged["step_counter"], inputs[0]["step_counter"]), "non-float tensors come from the first file"
    assert merged["lora_unet_x.alpha"].item() == 4.0

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_epoch"] == "4" and meta["other"] == "x", "metadata comes from the newest file"
    # the hashes describe the saved tensors: recompute independently from an ss_-only re-serialisation
    from safetensors.torch import save

    data = save(merged, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_model_hash"] == sha256_after_header(data)
    assert meta["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]

    printed = capsys.readouterr().out
    for p, w in zip(paths, weights):
        assert f"{p}" in printed and f"{w:.6f}" in printed


def test_no_sort_keeps_command_line_order(tmp_path):
    paths = write_checkpoints(tmp_path, 3)
    order = ema.order_checkpoints([paths[2], paths[0], paths[1]], sort=False)
    assert order == [paths[2], paths[0], paths[1]]
    assert ema.order_checkpoints([paths[2], paths[0], paths[1]]) == paths


def test_dry_run_prints_weights_only(tmp_path, capsys):
    paths = write_checkpoints(tmp_path, 3)
    assert lora_post_hoc_ema.main([str(p) for p in paths] + ["--sigma_rel", "0.2", "--dry_run"]) == 0
    assert "weight" in capsys.readouterr().out
    assert not list(tmp_path.glob("*ema*"))


def test_mismatched_alpha_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_checkpoints(tmp_path / "a", 1, alpha=4.0)
    b = write_checkpoints(tmp_path / "b", 1, alpha=8.0)
    with pytest.raises(UserError, match=r"alpha.*same network_alpha"):
        ema.merge_checkpoints([a[0], b[0]], [0.9])


def test_mismatched_keys_and_shapes_name_the_file(tmp_path):
    paths = write_checkpoints(tmp_path, 2)
    other = tmp_path / "other.safetensors"
    save_file({"lora_unet_y.lora_down.weight": torch.zeros(4, 8)}, str(other))
    with pytest.raises(UserError, match=r"other\.safetensors.*keys differ"):
        ema.merge_checkpoints([paths[0], other], [0.9])
    wide = load_file(str(paths[1]))
    wide["lora_unet_x.lora_down.weight"] = torch.zeros(8, 8, dtype=torch.bfloat16)
    wide_path = tmp_path / "wide.safetensors"
    save_file(wide, str(wide_path))
    with pytest.raises(UserError, match=r"wide\.safetensors.*lora_unet_x\.lora_down\.weight.*shape"):
        ema.merge_checkpoints([paths[0], wide_path], [0.9])


def test_input_errors(tmp_path):
    paths = write_checkpoints(tmp_path, 2)
    with pytest.raises(UserError, match="file not found"):
        ema.order_checkpoints([paths[0], tmp_path / "missing.safetensors"])
    with pytest.raises(UserError, match="at least two"):
        ema.order_checkpoints([paths[0]])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="broken.safetensors"):
        ema.merge_checkpoints([paths[0], broken], [0.9])
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(UserError, match="already exists"):
        lora_post_hoc_ema.main([str(p) for p in paths] + ["--output_file", str(out)])
    assert out.read_bytes() == b"keep"
    with pytest.raises(UserError, match="one of the input"):
        lora_post_hoc_ema.main([str(p) for p in paths] + ["--output_file", str(paths[1]), "--overwrite"])
    with pytest.raises(UserError, match="--beta"):
        ema.merge_betas(3, beta=1.5)


def test_full_model_checkpoints_merge(tmp_path):
    paths = []
    for k in range(3):
        p = tmp_path / f"model-{k}.safetensors"
        save_file({"model.diffusion_model.w": torch.full((3, 3), float(k), dtype=torch.float16)}, str(p))
        os.utime(p, (2_000_000 + k, 2_000_000 + k))
        paths.append(p)
    out = tmp_path / "model-ema.safetensors"
    lora_post_hoc_ema.main([str(p) for p in paths] + ["--beta", "0.5", "--output_file", str(out)])
    # weights 0.25, 0.25, 0.5 -> 0*0.25 + 1*0.25 + 2*0.5 = 1.25
    assert torch.equal(load_file(str(out))["model.diffusion_model.w"], torch.full((3, 3), 1.25, dtype=torch.float16))
