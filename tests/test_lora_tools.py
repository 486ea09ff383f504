"""The LoRA utilities in networks/: merge, SVD merge, resize, extract, check (tiny models, real files)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import networks.lora as lora
from family_helpers import assert_extracted, check_report, full_size_lora, merge_and_extract
from library.errors import UserError
from library.lora_tools import lowrank
from library.lora_tools.lora_file import LoRAModuleWeights, read_lora
from library.lora_tools.targets import load_model_for_lora
from library.models.families import sd_family
from library.models.saving import save_sd_model
from networks import (
    check_lora_weights,
    extract_lora_from_models,
    merge_lora,
    resize_lora,
    svd_merge_lora,
)
from tests.test_lora_network import randomize_up, rel, run_models

ROOT = Path(__file__).resolve().parents[1]


def load(path, v2=False):
    return load_model_for_lora(path, sd_family(v2)).models


@pytest.fixture(scope="module")
def sd1_file(tiny_sd1_dir, tmp_path_factory) -> Path:
    """The tiny SD1 model as an LDM-layout single file."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sd1.safetensors"
    return save_sd_model(path, load(tiny_sd1_dir), fmt="safetensors")


@functools.lru_cache(maxsize=2)
def loaded_once(model_dir: Path, v2: bool):
    """Models that make_lora only reads (building a network does not change them)."""
    return load(model_dir, v2)


def make_lora(model_dir: Path, path: Path, *, dim=4, alpha=2.0, conv_dim=None, seed=1, v2=False, **save_kwargs):
    """A random-weight LoRA (LoCon with ``conv_dim``) for the tiny model, saved like train_network.py does."""
    models = loaded_once(model_dir, v2)
    kwargs = {} if conv_dim is None else {"conv_dim": str(conv_dim), "conv_alpha": "1"}
    torch.manual_seed(seed)
    network = lora.create_network(1.0, dim, alpha, None, models.text_encoders[0], models.denoiser, **kwargs)
    randomize_up(network, seed=seed)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(alpha),
            "ss_v2": str(v2), "ss_training_comment": "trained", "ss_seed": "42"}
    network.save_weights(str(path), save_kwargs.get("dtype"), meta)
    return path


def weights_of(models) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v for k, v in models.denoiser.state_dict().items()}
    out.update({f"te.{k}": v for k, v in models.text_encoders[0].state_dict().items()})
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ------------------------------------------------------------------------------------------- merge into checkpoint


@pytest.mark.parametrize("out_name", ["merged.safetensors", "merged_folder"])
def test_merge_into_checkpoint_equals_in_memory_merge(tiny_sd1_dir, sd1_file, tmp_path, out_name):
    a = make_lora(tiny_sd1_dir, tmp_path / "a.safetensors", conv_dim=2)
    b = make_lora(tiny_sd1_dir, tmp_path / "b.safetensors", dim=3, alpha=3, seed=2)
    out = tmp_path / out_name
    merge_lora.main(["--sd_model", str(sd1_file), "--save_to", str(out), "--models", str(a), str(b),
                     "--ratios", "0.7", "-0.4"])

    expected = load(sd1_file)
    for file, ratio in ((a, 0.7), (b, -0.4)):
        te, unet = expected.text_encoders[0], expected.unet
        network, sd = lora.create_network_from_weights(ratio, str(file), None, te, unet)
        network.merge_to(te, unet, sd, torch.float32, "cpu")
    merged = load(out)
    assert max_diff(weights_of(merged), weights_of(expected)) < 1e-6
    assert max_diff(weights_of(merged), weights_of(load(sd1_file))) > 1e-3  # the merge changed something
    if out.suffix:
        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
        assert meta["modelspec.architecture"] == "stable-diffusion-v1"
        assert meta["modelspec.merged_from"] == "tiny_sd1, a, b"


def test_merge_into_checkpoint_matches_diffusers_fuse_lora(tiny_sd1_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    a = make_lora(tiny_sd1_dir, tmp_path / "a.safetensors", conv_dim=2)
    out = tmp_path / "merged"
    merge_lora.main(["--sd_model", str(tiny_sd1_dir), "--save_to", str(out), "--models", str(a), "--ratios", "0.8"])
    ours = load(out)

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1_dir), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(a))
    pipe.fuse_lora(lora_scale=0.8)
    pipe.unload_lora_weights()
    hidden_d, out_d = run_models(pipe.text_encoder, pipe.unet)
    hidden_o, out_o = run_models(ours.text_encoders[0], ours.unet)
    assert rel(hidden_o, hidden_d) < 1e-5 and rel(out_o, out_d) < 1e-5
    base_hidden, base_out = run_models(*[load(tiny_sd1_dir).text_encoders[0], load(tiny_sd1_dir).unet])
    assert rel(out_o, base_out) > 1e-3


def test_merge_into_checkpoint_save_precision(tiny_sd1_dir, sd1_file, tmp_path):
    a = make_lora(tiny_sd1_dir, tmp_path / "a.safetensors")
    out = tmp_path / "half.safetensors"
    merge_lora.main(["--sd_model", str(sd1_file), "--save_to", str(out), "--models", str(a),
                     "--save_precision", "fp16", "--no_metadata"])
    tensors = load_file(str(out))
    assert {v.dtype for v in tensors.values() if v.is_floating_point()} == {torch.float16}


# ------------------------------------------------------------------------------------------- merge LoRAs


def test_concat_merge_is_the_exact_sum_of_deltas(tiny_sd1_dir, tmp_path):
    a = make_lora(tiny_sd1_dir, tmp_path / "a.safetensors", dim=4, alpha=2, conv_dim=2)
    b = make_lora(tiny_sd1_dir, tmp_path / "b.safetensors", dim=2, alpha=8, conv_dim=2, seed=3)
    out = tmp_path / "ab.safetensors"
    merge_lora.main(["--save_to", str(out), "--models", str(a), str(b), "--ratios", "0.5", "-1.5", "--concat"])
    la, lb, merged = read_lora(a), read_lora(b), read_lora(out)
    assert set(merged.modules) == set(la.modules) | set(lb.modules)
    for name, m in merged.modules.items():
        expected = torch.zeros(m.weight_shape)
        if name in la.modules:
            expected += 0.5 * la.modules[name].delta()
        if name in lb.modules:
            expected -= 1.5 * lb.modules[name].delta()
        assert torch.allclose(m.delta(), expected, atol=1e-6, rtol=1e-5), name
        assert m.rank == sum(f.modules[name].rank for f in (la, lb) if name in f.modules)
    meta = merged.metadata
    assert meta["ss_network_dim"] == "6" and meta["ss_network_alpha"] == "6.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4.0"}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_svd_merge_is_the_best_approximation_of_the_sum(tiny_sd1_dir, tmp_path):
    a = make_lora(tiny_sd1_dir, tmp_path / "a.safetensors", dim=4, conv_dim=2)
    b = make_lora(tiny_sd1_dir, tmp_path / "b.safetensors", dim=4, seed=5)
    full = tmp_path / "full.safetensors"
    svd_merge_lora.main(["--save_to", str(full), "--models", str(a), str(b), "--ratios", "1", "0.5",
                         "--new_rank", "8", "--new_conv_rank", "2"])
    low = tmp_path / "low.safetensors"
    svd_merge_lora.main(["--save_to", str(low), "--models", str(a), str(b), "--ratios", "1", "0.5",
                         "--new_rank", "3", "--new_conv_rank", "1"])
    la, lb = read_lora(a), read_lora(b)
    for name, m in read_lora(full).modules.items():
        expected = la.modules[name].delta() + (0.5 * lb.modules[name].delta() if name in lb.modules else 0)
        assert torch.allclose(m.delta(), expected, atol=1e-5), name  # rank 8 >= 4 + 4: lossless
    for name, m in read_lora(low).modules.items():
        expected = la.modules[name].delta() + (0.5 * lb.modules[name].delta() if name in lb.modules else 0)
        U, S, Vh = torch.linalg.svd(lowrank.as_matrix(expected), full_matrices=False)
        k = 1 if m.is_3x3 else 3
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        assert m.rank == k
        assert torch.allclose(lowrank.as_matrix(m.delta()), best, atol=1e-5), name


# ------------------------------------------------------------------------------------------- resize


def test_resize_to_full_rank_is_lossless_and_lower_rank_keeps_top_singular_values(tiny_sd1_dir, tmp_path, capsys):
    src = make_lora(tiny_sd1_dir, tmp_path / "src.safetensors", dim=6, alpha=3, conv_dim=4)
    full, low = tmp_path / "full.safetensors", tmp_path / "low.safetensors"
    resize_lora.main(["--model", str(src), "--save_to", str(full), "--new_rank", "6", "--new_conv_rank", "4"])
    resize_lora.main(["--model", str(src), "--save_to", str(low), "--new_rank", "2", "--verbose"])
    assert "Average Frobenius norm retention" in capsys.readouterr().out
    original, lossless, reduced = read_lora(src), read_lora(full), read_lora(low)
    for name, m in original.modules.items():
        assert torch.allclose(lossless.modules[name].delta(), m.delta(), atol=1e-6), name
        r = reduced.modules[name]
        assert r.rank == 2 and r.scale == pytest.approx(m.scale)  # the scale alpha / r is kept
        S_full = torch.linalg.svdvals(lowrank.as_matrix(m.delta()))
        S_kept = torch.linalg.svdvals(lowrank.as_matrix(r.delta()))
        assert torch.allclose(S_kept[:2], S_full[:2], rtol=1e-4, atol=1e-7)
        assert S_kept.numel() <= 2 or float(S_kept[2:].abs().max()) < 1e-5
    meta = reduced.metadata
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1.0"
    assert meta["ss_training_comment"] == "dimension is resized from 6 to 2; trained"
    assert meta["ss_seed"] == "42"  # the rest is kept
    with open(low, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        import hashlib

        assert hashlib.sha256(f.read()).hexdigest() == meta["sshs_model_hash"]


@pytest.mark.parametrize("method,param", [("sv_fro", 0.9), ("sv_cumulative", 0.8), ("sv_ratio", 3.0)])
def test_dynamic_resize_meets_its_target(tiny_sd1_dir, tmp_path, method, param):
    src = make_lora(tiny_sd1_dir, tmp_path / "src.safetensors", dim=8, alpha=8)
    out = tmp_path / "dyn.safetensors"
    resize_lora.main(["--model", str(src), "--save_to", str(out), "--new_rank", "8",
                      "--dynamic_method", method, "--dynamic_param", str(param)])
    original, resized = read_lora(src), read_lora(out)
    assert resized.metadata["ss_network_dim"] == "Dynamic"
    for name, m in original.modules.items():
        S = torch.linalg.svdvals(lowrank.as_matrix(m.delta()))
        r = resized.modules[name].rank
        if method == "sv_fro":
            share = (S[:r].pow(2).sum() / S.pow(2).sum()).sqrt()
            smaller = (S[: r - 1].pow(2).sum() / S.pow(2).sum()).sqrt()
        elif method == "sv_cumulative":
            share, smaller = S[:r].sum() / S.sum(), S[: r - 1].sum() / S.sum()
        else:
            assert bool((S[:r] > S[0] / param).all()) and (r == 8 or float(S[r]) <= float(S[0]) / param)
            continue
        assert float(share) >= param - 1e-6 and (r == 1 or float(smaller) < param)


# ------------------------------------------------------------------------------------------- extract


def test_extract_recovers_a_known_low_rank_delta(tiny_sd1_dir, sd1_file, tmp_path):
    src = make_lora(tiny_sd1_dir, tmp_path / "known.safetensors", dim=2, alpha=2, conv_dim=2)
    extracted = merge_and_extract(sd1_file, src, tmp_path, "--dim", "2", "--conv_dim", "2", "--clamp_quantile", "1")
    assert_extracted(src, extracted)
    te = [n for n in extracted.modules if n.startswith("lora_te")]
    assert te, "the text encoder differs, so it is extracted"
    meta = extracted.metadata
    assert meta["ss_network_dim"] == "2" and meta["ss_base_model_version"] == "sd_v1"


def test_extract_skips_an_unchanged_text_encoder(tiny_sd1_dir, sd1_file, tmp_path):
    src = make_lora(tiny_sd1_dir, tmp_path / "known.safetensors")
    unet_only = tmp_path / "unet_only.safetensors"
    sd = {k: v for k, v in load_file(str(src)).items() if k.startswith("lora_unet")}
    save_file(sd, str(unet_only))
    names = merge_and_extract(sd1_file, unet_only, tmp_path).modules
    assert names and not any(n.startswith("lora_te") for n in names)


# ------------------------------------------------------------------------------------------- check


def test_check_reports_family_counts_and_loaders(tiny_sd1_dir, tmp_path, capsys):
    from library.lora_tools import references

    te, unet = references.sd_reference("sd1")
    targets = {t.lora_name: tuple(t.module.weight.shape)
               for t in lora.find_target_modules(te, unet, scan_conv_blocks=False)}
    path = tmp_path / "full_size.safetensors"
    full_size_lora(targets, path, rename=lambda n: n.replace("lora_te_text_model_", "lora_te_"),  # transformers 5
                   metadata={"ss_network_dim": "1", "ss_network_alpha": "1.0"})
    check_report(capsys, [str(path)], ["family: SD1.x", "modules: 264 (te: 72, unet: 192)", "ranks: 1: 264",
                                       "without 'text_model_'", "loads in networks.lora: yes: all 264 modules match",
                                       "loads in diffusers: yes: layers applied: unet 192/192, text encoder 72/72"])


def test_check_tiny_lora_without_loaders_and_all_keys(tiny_sd1_dir, tmp_path, capsys):
    path = make_lora(tiny_sd1_dir, tmp_path / "a.safetensors", dim=4, alpha=2, conv_dim=2)
    check_lora_weights.main([str(path), "--no_loaders", "-s"])
    out = capsys.readouterr().out
    assert "family: SD1.x" in out and "ranks: 2: 34, 4: 155" in out and "conv 3x3 (LoCon): 34" in out
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight,(4-32-1-1)," in out


def test_check_reports_other_families_and_metadata_problems(tmp_path, capsys):
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 16),
          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(48, 2),
          "unrelated.weight": torch.zeros(1)}
    path = tmp_path / "flux.safetensors"
    save_file(sd, str(path), {"ss_network_dim": "8", "sshs_model_hash": "0" * 64})
    check_lora_weights.main([str(path)])
    out = capsys.readouterr().out
    assert "family: FLUX.1" in out
    assert "without alpha" in out and "unrelated.weight" in out
    assert "ss_network_dim says 8, the tensors say 2" in out and "sshs_model_hash does not match" in out
    assert "loads in networks.lora: no: 1 modules have other shapes than the model" in out  # 16 wide, not 3072
    assert "loads in diffusers: no:" in out
    unknown = tmp_path / "unknown.safetensors"
    save_file({"lora_unet_foo.lora_down.weight": torch.randn(2, 4), "lora_unet_foo.lora_up.weight": torch.randn(4, 2)},
              str(unknown))
    check_lora_weights.main([str(unknown)])
    out = capsys.readouterr().out
    assert "family: unknown" in out and "loads in diffusers: not checked: no full-size unknown reference model" in out


# ------------------------------------------------------------------------------------------- spellings


def test_non_standard_spellings_read_as_the_standard(tiny_sd1_dir, tmp_path):
    src = make_lora(tiny_sd1_dir, tmp_path / "std.safetensors")
    standard = load_file(str(src))
    variants = {}
    for key, value in standard.items():
        name, part = key.split(".", 1)
        name = name.replace("lora_te_text_model_", "lora_te_")
        part = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(part, part)
        variants[f"{name}.{part}"] = value
    odd = tmp_path / "odd.safetensors"
    save_file(variants, str(odd))
    out = tmp_path / "resaved.safetensors"
    merge_lora.main(["--save_to", str(out), "--models", str(odd)])
    assert set(load_file(str(out))) == set(standard)
    notes = read_lora(odd).notes
    assert len(notes) == 2


def test_diffusers_peft_file_reads_as_kohya(tiny_sd1_dir, tmp_path):
    src = make_lora(tiny_sd1_dir, tmp_path / "std.safetensors")
    standard = read_lora(src)
    sd = {}
    for name, m in standard.modules.items():
        if name.startswith("lora_unet_"):
            continue
        path = "text_encoder.text_model." + name[len("lora_te_text_model_"):].replace("_", ".")
        path = path.replace("self.attn", "self_attn").replace("q.proj", "q_proj").replace("k.proj", "k_proj")
        path = path.replace("v.proj", "v_proj").replace("out.proj", "out_proj")
        sd[f"{path}.lora_A.weight"] = m.down * m.scale
        sd[f"{path}.lora_B.weight"] = m.up
    peft_file = tmp_path / "peft.safetensors"
    save_file(sd, str(peft_file))
    read = read_lora(peft_file)
    assert set(read.modules) == {n for n in standard.modules if n.startswith("lora_te")}
    for name, m in read.modules.items():
        assert torch.allclose(m.delta(), standard.modules[name].delta(), atol=1e-7)


# ------------------------------------------------------------------------------------------- bad inputs


def _error(main, argv) -> str:
    with pytest.raises(UserError) as info:
        main(argv)
    return info.value.message


def test_refuses_to_overwrite_and_bad_inputs_are_one_message(tiny_sd1_dir, sd1_file, tmp_path):
    a = make_lora(tiny_sd1_dir, tmp_path / "a.safetensors")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"mine")
    msg = _error(merge_lora.main, ["--save_to", str(out), "--models", str(a)])
    assert "already exists" in msg and "--overwrite" in msg and out.read_bytes() == b"mine"
    merge_lora.main(["--save_to", str(out), "--models", str(a), "--overwrite"])
    assert read_lora(out).modules

    assert "--save_to" in _error(resize_lora.main, ["--model", str(a), "--save_to", str(a)])
    assert "not found" in _error(resize_lora.main, ["--model", str(tmp_path / "nope.safetensors"),
                                                    "--save_to", str(tmp_path / "r.safetensors")])
    assert "one ratio per LoRA" in _error(merge_lora.main, ["--save_to", str(tmp_path / "m.safetensors"),
                                                            "--models", str(a), "--ratios", "1", "2"])
    assert "needs --dynamic_param" in _error(resize_lora.main, ["--model", str(a), "--save_to",
                                                               str(tmp_path / "r.safetensors"),
                                                               "--dynamic_method", "sv_fro"])
    assert "did you mean --new_rank" in _error(resize_lora.main, ["--new_rnk", "4"])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert "cannot read" in _error(check_lora_weights.main, [str(bad)])
    assert "no LoRA modules" in _error(check_lora_weights.main, [str(sd1_file)])
    sd2_lora = tmp_path / "sd2.safetensors"
    sd = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 1024),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1024, 2)}
    save_file(sd, str(sd2_lora))
    msg = _error(merge_lora.main, ["--sd_model", str(sd1_file), "--save_to", str(tmp_path / "m.safetensors"),
                                   "--models", str(sd2_lora)])
    assert "SD2.x LoRA" in msg and "SD1.x" in msg
    msg = _error(merge_lora.main, ["--save_to", str(tmp_path / "m.safetensors"), "--models", str(a), str(sd2_lora)])
    assert "different model families" in msg
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _error(svd_merge_lora.main, ["--save_to", str(tmp_path / "s.safetensors"),
                                                                       "--models", str(a), "--device", "cuda"])
    assert "--v2 is set" in _error(
        extract_lora_from_models.main,
        ["--model_org", str(sd1_file), "--model_tuned", str(sd1_file), "--save_to", str(tmp_path / "e.safetensors"),
         "--v2"])


def test_scripts_run_as_files_and_print_one_line_errors(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "networks" / "merge_lora.py"), "--help"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "--sd_model" in result.stdout, result.stderr
    result = subprocess.run([sys.executable, str(ROOT / "networks" / "check_lora_weights.py"),
                             str(tmp_path / "missing.safetensors")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: LoRA file") and "not found" in result.stderr


def test_module_weights_delta_shapes():
    m = LoRAModuleWeights(torch.randn(2, 3, 3, 3), torch.randn(5, 2, 1, 1), 1.0)
    assert m.weight_shape == (5, 3, 3, 3) and m.is_3x3 and m.delta().shape == (5, 3, 3, 3)


def test_sd2_merge_into_checkpoint_and_family(tiny_sd2_dir, tmp_path, capsys):
    a = make_lora(tiny_sd2_dir, tmp_path / "a.safetensors", conv_dim=2, v2=True)
    check_lora_weights.main([str(a), "--no_loaders"])
    assert "family: SD2.x" in capsys.readouterr().out
    out = tmp_path / "merged.safetensors"
    merge_lora.main(["--sd_model", str(tiny_sd2_dir), "--save_to", str(out), "--models", str(a), "--ratios", "0.5"])
    expected = load(tiny_sd2_dir, v2=True)
    network, sd = lora.create_network_from_weights(0.5, str(a), None, expected.text_encoders[0], expected.unet)
    network.merge_to(expected.text_encoders[0], expected.unet, sd, torch.float32, "cpu")
    assert max_diff(weights_of(load(out, v2=True)), weights_of(expected)) < 1e-6
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v2-512"
    merged = tmp_path / "lora.safetensors"
    merge_lora.main(["--save_to", str(merged), "--models", str(a)])
    meta = read_lora(merged).metadata
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2"


def test_shuffle_keeps_the_deltas_and_pickles_round_trip(tiny_sd1_dir, tmp_path):
    a = make_lora(tiny_sd1_dir, tmp_path / "a.safetensors", conv_dim=2)
    shuffled = tmp_path / "shuffled.ckpt"
    merge_lora.main(["--save_to", str(shuffled), "--models", str(a), "--shuffle", "--ratios", "0.5"])
    assert set(torch.load(str(shuffled), weights_only=True)) == set(load_file(str(a)))
    original, result = read_lora(a), read_lora(shuffled)
    for name, m in original.modules.items():
        assert torch.allclose(result.modules[name].delta(), 0.5 * m.delta(), atol=1e-6), name
    plain = tmp_path / "plain.safetensors"
    merge_lora.main(["--save_to", str(plain), "--models", str(a), "--ratios", "0.5"])
    in_order = read_lora(plain).modules
    assert any(not torch.equal(in_order[n].down, m.down) for n, m in result.modules.items())  # ranks moved
