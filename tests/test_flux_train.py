"""flux_train.py on the tiny FLUX: the saved BFL single file loads back bit-exact through our loader,
--blockwise_fused_optimizers gives the weights of the plain step, --mem_eff_save writes the same tensors,
EMA files, bit-exact resume, and FLUX fine-tuning refusals before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from family_helpers import (LATENT_BUCKETS, assert_resume_is_bit_exact, captioned_folder, forbid_loading, in_json_argv,
                            prepare_latents_refuses, with_dataset)
from library.errors import UserError
from library.models.flux.tiny import save_tiny_flux_files


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_ft")
    return with_dataset(root, save_tiny_flux_files(root / "dev", seed=0))


def _argv(flux, out: Path, *, steps: int = 2, extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    return ["--pretrained_model_name_or_path", str(flux["flux"]), "--clip_l", str(flux["clip_l"]),
            "--t5xxl", str(flux["t5xxl"]), "--ae", str(flux["ae"]), "--dataset_config", str(flux["data"]),
            "--tokenizer_cache_dir", str(flux["tokenizer_cache_dir"]), "--t5xxl_max_token_length", "16",
            "--output_dir", str(out), "--output_name", "ft", "--learning_rate", "1e-3", "--seed", "1",
            "--max_train_steps", str(steps), "--max_data_loader_n_workers", "0", "--cache_latents",
            "--optimizer_type", "AdamW", *extra]


def _main(argv: list[str]) -> Path:
    import flux_train

    torch.set_num_threads(1)
    path = flux_train.main(argv)
    assert path is not None and path.is_file()
    return path


def _load_transformer(path: Path):
    from library.models.flux.loading import load_transformer

    return load_transformer(path, torch.float32)


def test_saves_the_bfl_layout_that_loads_back_bit_exact(flux, tmp_path):
    out = _main(_argv(flux, tmp_path / "out", extra=["--save_precision", "float"]))
    saved = load_file(str(out))
    base = load_file(str(flux["flux"]))
    assert saved.keys() == base.keys() and "double_blocks.0.img_attn.qkv.weight" in saved
    assert any(not torch.equal(saved[k], base[k].float()) for k in saved)  # it trained
    model = _load_transformer(out)
    from library.models.flux.conversion import FluxArchitecture, diffusers_to_bfl

    again = diffusers_to_bfl(model.state_dict(), FluxArchitecture.from_diffusers_config(model.config))
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "flux-1-dev" and meta["ss_timestep_sampling"] == "sigma"


def test_blockwise_fused_optimizers_give_the_plain_step_and_mem_eff_save_the_same_file(flux, tmp_path):
    common = ["--max_grad_norm", "0", "--save_precision", "float"]
    plain = load_file(str(_main(_argv(flux, tmp_path / "a", extra=common))))
    blockwise = _main(_argv(flux, tmp_path / "b", extra=common + ["--blockwise_fused_optimizers", "--mem_eff_save"]))
    fused = load_file(str(blockwise))
    assert plain.keys() == fused.keys()
    for k in plain:
        torch.testing.assert_close(fused[k], plain[k], rtol=0, atol=1e-6, msg=k)


def test_mem_eff_save_writes_the_same_tensors_and_metadata(tmp_path):
    from library.models.flux.saving import save_flux_transformer
    from library.models.flux.tiny import build_tiny_flux

    transformer = build_tiny_flux()["transformer"]
    for dtype in (None, torch.bfloat16, torch.float8_e4m3fn):
        a = save_flux_transformer(tmp_path / "a.safetensors", transformer, dtype=dtype, metadata={"k": "v"})
        b = save_flux_transformer(tmp_path / "b.safetensors", transformer, dtype=dtype, metadata={"k": "v"},
                                  mem_eff=True)
        sa, sb = load_file(str(a)), load_file(str(b))
        assert sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k].view(torch.uint8),
                                                                                        sb[k].view(torch.uint8))
                                              for k in sa)
        with safe_open(str(b), "pt") as f:
            assert f.metadata() == {"k": "v"}


def test_ema_and_resume_are_bit_exact(flux, tmp_path):
    extra = ["--ema_decay", "0.9", "--save_every_n_steps", "2", "--save_state", "--noise_offset", "0.05"]
    weights = assert_resume_is_bit_exact("flux_train.py", lambda out, more: _argv(flux, out, steps=4, extra=more),
                                         tmp_path, extra, name="ft", files=("ft.safetensors", "ft-ema.safetensors"))
    a, e = weights["ft.safetensors"], weights["ft-ema.safetensors"]
    assert any(not torch.equal(a[k], e[k]) for k in a)


@pytest.mark.parametrize("extra, message", [
    (["--train_text_encoder"], "trains the FLUX transformer only"),
    (["--save_model_as", "diffusers"], "BFL layout"),
    (["--blockwise_fused_optimizers", "--gradient_accumulation_steps", "2"], "gradient_accumulation_steps"),
    (["--blockwise_fused_optimizers", "--optimizer_type", "AdaFactor", "--fused_backward_pass"], "use one of them"),
    (["--fused_optimizer_groups", "4"], "--blockwise_fused_optimizers"),
])
def test_refusals_before_any_model_loads(flux, tmp_path, monkeypatch, extra, message):
    import library.models.flux.loading as loading

    forbid_loading(monkeypatch, loading, "load_flux_models")
    with pytest.raises(UserError, match=message):
        _main(_argv(flux, tmp_path / "out", extra=extra))


def test_blockwise_steps_happen_inside_backward_one_block_at_a_time():
    from library.training.fused_backward import BlockwiseSteps

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    reference = torch.nn.Sequential(*[torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)])
    reference.load_state_dict(model.state_dict())
    groups = [{"params": list(m.parameters())} for m in model]
    optimizer = torch.optim.AdamW(groups, lr=0.1)
    seen = []
    model[1].register_full_backward_hook(lambda *a: seen.append(model[2].weight.grad))  # after block 2's step
    steps = BlockwiseSteps(optimizer, max_grad_norm=None)
    x = torch.randn(8, 4)
    model(x).square().mean().backward()
    assert seen == [None] and all(p.grad is None for p in model.parameters())  # every group stepped in backward
    steps.flush()  # nothing left over
    plain = torch.optim.AdamW(reference.parameters(), lr=0.1)
    reference(x).square().mean().backward()
    plain.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_prepare_buckets_latents_writes_flux_latents_that_flux_train_reads(flux, tmp_path):
    import numpy as np

    from library.tools.prepare_latents import main as prepare

    folder, in_json, out_json = captioned_folder(tmp_path)
    base = [str(folder), str(in_json), str(out_json)]
    prepare_latents_refuses(base, [(flux["flux"], ["--flux"], "this is the FLUX.1 transformer"),
                                   (flux["ae"], [], "16-channel autoencoder .* add --flux")])
    assert prepare([*base, str(flux["ae"]), "--flux", "--max_resolution", "64,64", *LATENT_BUCKETS]) == 0
    npz = sorted(folder.glob("*.npz"))
    assert len(npz) == 2 and all(p.name.endswith("_flux.npz") for p in npz)
    with np.load(npz[0]) as f:
        assert f["latents"].shape[0] == 16
    stamps = {p: p.stat().st_mtime_ns for p in npz}
    argv = in_json_argv(_argv(flux, tmp_path / "out", steps=1), folder, out_json)
    argv.remove("--cache_latents")
    _main(argv)
    assert sorted(folder.glob("*.npz")) == npz and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
