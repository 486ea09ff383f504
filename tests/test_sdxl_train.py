"""sdxl_train.py on a tiny SDXL: the saved single file loads back bit-exact (ours and diffusers'
from_single_file), diffusers folders load in StableDiffusionXLPipeline, per-encoder learning rates and
--block_lr reach the right weights, and a --block_lr of the wrong length is one message."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from library.errors import UserError
from tests.train_helpers import dreambooth_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from library.models.tiny_sdxl import save_tiny_sdxl_diffusers_model, save_tiny_sdxl_single_file

    root = tmp_path_factory.mktemp("sdxl_ft")
    return {"folder": save_tiny_sdxl_diffusers_model(root / "model"),
            "file": save_tiny_sdxl_single_file(root / "base.safetensors"),
            "data": dreambooth_dir(root / "train", count=2)}


def ft_args(model: Path, out: Path, data: Path, *, steps: int = 2, extra: list[str] | None = None) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64",
            "--train_batch_size", "2", "--output_dir", str(out), "--output_name", "ft", "--learning_rate", "1e-3",
            "--max_train_steps", str(steps), "--seed", "1", "--max_data_loader_n_workers", "0", *(extra or [])]


def run_ft(argv: list[str]) -> Path:
    import sdxl_train

    torch.set_num_threads(1)
    path = sdxl_train.main(argv)
    assert path is not None and path.exists()
    return path


def load(model: Path):
    from library.models.families import resolve_family

    args = argparse.Namespace(pretrained_model_name_or_path=str(model), v2=False, v_parameterization=False,
                              vae=None, tokenizer_cache_dir=None)
    family = resolve_family(args, ("sdxl",))
    return family.spec.load(args, family, device="cpu", dtype=torch.float32)


def states(models) -> list[dict[str, torch.Tensor]]:
    return [m.state_dict() for m in (models.unet, *models.text_encoders)]


def test_single_file_round_trip_and_diffusers_from_single_file(tiny, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    from library.models.sdxl_single_file import sdxl_ldm_state_dict

    final = run_ft(ft_args(tiny["file"], tmp_path / "out", tiny["data"], extra=[
        "--train_text_encoder", "--learning_rate_te1", "1e-3", "--learning_rate_te2", "2e-3"]))
    assert final == tmp_path / "out" / "ft.safetensors"
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    base, ours = load(tiny["file"]), load(final)
    for a, b in zip(states(base), states(ours)):  # UNet and both text encoders trained
        assert any(not torch.equal(a[k], b[k]) for k in a)
    saved = load_file(str(final))
    again = sdxl_ldm_state_dict(ours.unet, ours.vae, ours.text_encoders)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)

    pipe = StableDiffusionXLPipeline.from_single_file(str(final), config=str(tiny["folder"]), local_files_only=True)
    for mine, theirs in zip(states(ours), [m.state_dict() for m in (pipe.unet, pipe.text_encoder,
                                                                     pipe.text_encoder_2)]):
        for k, v in mine.items():
            if k in theirs or f"text_model.{k}" in theirs:
                assert torch.equal(v, theirs.get(k, theirs.get(f"text_model.{k}"))), k
    assert torch.equal(pipe.text_encoder_2.text_projection.weight, ours.text_encoders[1].text_projection.weight)


def test_diffusers_folder_and_block_lr(tiny, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    rates = ["0"] * 22 + ["1e-3"]  # only the output layers (conv_norm_out, conv_out) learn
    final = run_ft(ft_args(tiny["folder"], tmp_path / "out", tiny["data"], steps=1, extra=[
        "--save_model_as", "diffusers_safetensors", "--block_lr", ",".join(rates)]))
    before, after = load(tiny["folder"]).unet.state_dict(), load(final).unet.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"conv_norm_out", "conv_out"}
    pipe = StableDiffusionXLPipeline.from_pretrained(str(final), local_files_only=True)
    assert torch.equal(pipe.unet.conv_out.weight, after["conv_out.weight"])


@pytest.mark.parametrize("extra, message", [
    (["--block_lr", ",".join(["1e-4"] * 22)], "--block_lr has 22 values; SDXL needs 23"),
    (["--learning_rate_te1", "1e-5"], "add --train_text_encoder"),
    (["--fused_optimizer_groups", "4", "--gradient_accumulation_steps", "2"], "--gradient_accumulation_steps > 1"),
    (["--fused_optimizer_groups", "0"], "give a number of groups >= 1"),
    (["--fused_optimizer_groups", "4", "--fused_backward_pass", "--optimizer_type", "AdaFactor"],
     "use one of them"),
])
def test_refused_options(tiny, tmp_path, extra, message):
    with pytest.raises(UserError) as err:
        run_ft(ft_args(tiny["file"], tmp_path / "out", tiny["data"], extra=extra))
    assert message in err.value.message


def unet_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if k.startswith("model.diffusion_model.")}


def test_fused_optimizer_groups_train_exactly_like_one_optimizer_step(tiny, tmp_path):
    """AdamW updates each parameter from its own state, so stepping ~3 groups inside the backward pass gives the
    weights of the ordinary step (no clipping: the fused path clips per tensor, as sd-scripts does)."""
    from library.training.fused_backward import split_param_groups

    common = ["--optimizer_type", "AdamW", "--max_grad_norm", "0", "--save_precision", "float"]
    plain = run_ft(ft_args(tiny["file"], tmp_path / "plain", tiny["data"], extra=common))
    fused = run_ft(ft_args(tiny["file"], tmp_path / "fused", tiny["data"],
                           extra=common + ["--fused_optimizer_groups", "3"]))
    a, b = unet_weights(plain), unet_weights(fused)
    base = unet_weights(tiny["file"])
    assert any(not torch.equal(a[k], base[k].float()) for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(10)]
    groups, names = split_param_groups([{"params": params[:7], "lr": 1.0}, {"params": params[7:], "lr": 2.0}],
                                       ["unet", "textencoder1"], 3)
    assert [len(g["params"]) for g in groups] == [4, 3, 3] and names == ["unet_1", "unet_2", "textencoder1"]
    assert [g["lr"] for g in groups] == [1.0, 1.0, 2.0]


def test_fused_backward_pass_trains_like_the_ordinary_adafactor_step(tiny, tmp_path):
    common = ["--optimizer_type", "AdaFactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
              "warmup_init=False", "--max_grad_norm", "0", "--save_precision", "float"]
    plain = run_ft(ft_args(tiny["file"], tmp_path / "plain", tiny["data"], extra=common))
    fused = run_ft(ft_args(tiny["file"], tmp_path / "fused", tiny["data"], extra=common + ["--fused_backward_pass"]))
    a, b, base = unet_weights(plain), unet_weights(fused), unet_weights(tiny["file"])
    assert any(not torch.equal(a[k], base[k].float()) for k in a)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_full_bf16_and_ema(tiny, tmp_path):
    """--full_bf16 trains bf16 weights under bf16 autocast; --ema_decay writes the averaged model beside them."""
    final = run_ft(ft_args(tiny["file"], tmp_path / "out", tiny["data"], extra=[
        "--mixed_precision", "bf16", "--full_bf16", "--ema_decay", "0.5", "--save_precision", "bf16"]))
    ema = final.with_name("ft-ema.safetensors")
    assert ema.is_file()
    base, trained, averaged = unet_weights(tiny["file"]), unet_weights(final), unet_weights(ema)
    assert all(v.dtype == torch.bfloat16 for v in trained.values())
    moved = [k for k in base if not torch.equal(trained[k].float(), base[k].float())]
    assert moved
    # two steps of decay 0.5: the average lies strictly between the base and the trained weights somewhere
    assert any(not torch.equal(averaged[k], trained[k]) for k in moved)
    assert load(ema).unet is not None  # the EMA file is a whole SDXL model our loader reads


def test_prepare_buckets_latents_writes_sdxl_latents_that_training_reads(tiny, tmp_path):
    import json

    from library.tools.prepare_latents import main as prepare
    from tests.train_helpers import make_images

    folder = make_images(tmp_path / "train", count=2)
    in_json, out_json = tmp_path / "meta.json", tmp_path / "meta_lat.json"
    in_json.write_text(json.dumps({f"img{i}": {"caption": f"sks {i}"} for i in range(2)}), encoding="utf-8")
    buckets = ["--min_bucket_reso", "64", "--max_bucket_reso", "128"]
    assert prepare([str(folder), str(in_json), str(out_json), str(tiny["file"]), "--max_resolution", "64,64",
                    *buckets]) == 0
    npz = sorted(folder.glob("*.npz"))
    assert len(npz) == 2 and all(p.name.endswith("_sdxl.npz") for p in npz)  # never mixed with SD1 caches
    stamps = {p: p.stat().st_mtime_ns for p in npz}
    run_ft(["--pretrained_model_name_or_path", str(tiny["file"]), "--in_json", str(out_json), "--train_data_dir",
            str(folder), "--resolution", "64", "--enable_bucket", *buckets, "--train_batch_size", "2",
            "--output_dir", str(tmp_path / "out"), "--learning_rate", "1e-4", "--max_train_steps", "1",
            "--seed", "1", "--max_data_loader_n_workers", "0"])
    assert sorted(folder.glob("*.npz")) == npz and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
