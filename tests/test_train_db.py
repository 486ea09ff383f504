"""train_db.py on a tiny model: regularization images and the prior loss weight, stopping the text encoder,
EMA, the save formats (loaded back by our loader and by diffusers offline), resume, the fused backward pass,
and the options it refuses."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from tests.full_weight_helpers import TE, UNET, assert_diffusers_loads_the_same, ldm_weights, part, same
from tests.train_helpers import make_images




@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("db_data")
    make_images(root / "train" / "1_sks dog", count=2, caption="sks dog")
    make_images(root / "reg" / "1_dog", count=2, caption="a dog", seed=7)
    make_images(root / "one" / "1_sks dog", count=1, caption="sks dog")
    make_images(root / "one_reg" / "1_dog", count=1, caption="a dog", seed=7)
    return {"train": root / "train", "reg": root / "reg", "one": root / "one", "one_reg": root / "one_reg"}


def db_args(model: Path, out: Path, train: Path, *, steps: int, reg: Path | None = None, batch: int = 2,
            extra: list[str] | None = None) -> list[str]:
    argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(train), "--resolution", "64",
            "--train_batch_size", str(batch), "--output_dir", str(out), "--output_name", "db", "--learning_rate",
            "1e-3", "--max_train_steps", str(steps), "--seed", "1", "--max_data_loader_n_workers", "0"]
    if reg is not None:
        argv += ["--reg_data_dir", str(reg)]
    return argv + list(extra or [])


def run_db(argv: list[str]) -> Path:
    import train_db

    path = train_db.main(argv)
    assert path is not None and path.exists()
    return path


def test_stop_text_encoder_and_ema(tiny_sd1_dir, data, tmp_path):
    """--stop_text_encoder_training 2: the text encoder changes in steps 1-2 only, the UNet in every step;
    the EMA file is the fixed-decay average of the raw weights after each step."""
    decay = 0.5
    out = tmp_path / "out"
    final = run_db(db_args(tiny_sd1_dir, out, data["train"], steps=3, reg=data["reg"], extra=[
        "--stop_text_encoder_training", "2", "--save_every_n_steps", "1", "--save_model_as", "safetensors",
        "--ema_decay", str(decay)]))
    assert final == out / "db.safetensors"
    w = [ldm_weights(tiny_sd1_dir)] + [ldm_weights(out / f"db-step0000000{i}.safetensors") for i in (1, 2)]
    w.append(ldm_weights(final))
    assert not same(part(w[0], TE), part(w[1], TE)) and not same(part(w[1], TE), part(w[2], TE))
    assert same(part(w[2], TE), part(w[3], TE))
    for i in range(3):
        assert not same(part(w[i], UNET), part(w[i + 1], UNET))

    ema = ldm_weights(out / "db-ema.safetensors")
    for prefix in (UNET, TE):
        expected = part(w[0], prefix)
        for raw in w[1:]:
            expected = {k: decay * expected[k] + (1 - decay) * v for k, v in part(raw, prefix).items()}
        got = part(ema, prefix)
        assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
        assert not same(got, part(w[3], prefix))
    assert (out / "db-step00000001-ema.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(out / "db-ema.safetensors"), "pt") as f:
        assert f.metadata()["ss_ema"] == "decay=0.5" and f.metadata()["ss_steps"] == "3"

    from library.models.loading import load_sd_models
    from library.models.saving import ldm_state_dict

    loaded = load_sd_models(argparse.Namespace(pretrained_model_name_or_path=str(final),
                                               tokenizer_cache_dir=str(tiny_sd1_dir)))
    assert same(part(ldm_state_dict(loaded), UNET), part(w[3], UNET))


def test_prior_loss_weight_zero_makes_reg_samples_contribute_nothing(tiny_sd1_dir, data, tmp_path):
    """One training and one regularization image, batch 1, plain SGD: with prior_loss_weight 0 exactly one
    of the two steps (the regularization sample's) leaves every weight as it was."""
    out = tmp_path / "out"
    final = run_db(db_args(tiny_sd1_dir, out, data["one"], steps=2, reg=data["one_reg"], batch=1, extra=[
        "--prior_loss_weight", "0", "--optimizer_type", "SGD", "--save_every_n_steps", "1",
        "--save_model_as", "ckpt"]))
    assert final.suffix == ".ckpt"
    w = [ldm_weights(tiny_sd1_dir), ldm_weights(out / "db-step00000001.ckpt"), ldm_weights(final)]
    changed = [not same(part(w[i], UNET), part(w[i + 1], UNET)) for i in range(2)]
    assert sorted(changed) == [False, True]

    out1 = tmp_path / "out1"
    run_db(db_args(tiny_sd1_dir, out1, data["one"], steps=2, reg=data["one_reg"], batch=1, extra=[
        "--optimizer_type", "SGD", "--save_every_n_steps", "1", "--save_model_as", "ckpt"]))
    w1 = [w[0], ldm_weights(out1 / "db-step00000001.ckpt"), ldm_weights(out1 / "db.ckpt")]
    assert all(not same(part(w1[i], UNET), part(w1[i + 1], UNET)) for i in range(2))
    assert_diffusers_loads_the_same(out1 / "db.ckpt", tiny_sd1_dir)


def test_prior_loss_weight_scales_the_regularization_step(tiny_sd1_dir, data, tmp_path):
    """Plain SGD without clipping, batch 1, from the same weights: the regularization sample's step moves the
    weights by prior_loss_weight times what it does with weight 1."""
    steps = {}
    for weight in ("1", "0.25"):
        out = tmp_path / weight
        run_db(db_args(tiny_sd1_dir, out, data["one"], steps=2, reg=data["one_reg"], batch=1, extra=[
            "--prior_loss_weight", weight, "--optimizer_type", "SGD", "--max_grad_norm", "0",
            "--save_every_n_steps", "1", "--save_model_as", "safetensors"]))
        w = [part(ldm_weights(p), UNET) for p in (tiny_sd1_dir, out / "db-step00000001.safetensors",
                                                   out / "db.safetensors")]
        steps[weight] = [{k: w[i + 1][k] - w[i][k] for k in w[0]} for i in range(2)]
    norms = {wt: [sum(float(d.norm()) ** 2 for d in step.values()) ** 0.5 for step in s] for wt, s in steps.items()}
    ratios = [b / a for a, b in zip(norms["1"], norms["0.25"])]
    assert sum(r == pytest.approx(0.25, rel=1e-4) for r in ratios) == 1, ratios


def test_diffusers_resume_is_bit_exact(tiny_sd1_dir, data, tmp_path):
    """Stop after step 2 and resume: the same model (and EMA) as the uninterrupted run; the folders load with
    diffusers offline."""
    extra = ["--save_model_as", "diffusers", "--ema_decay", "0.9", "--save_state", "--save_every_n_steps", "2",
             "--lr_scheduler", "cosine", "--noise_offset", "0.05", "--flip_aug"]
    full = run_db(db_args(tiny_sd1_dir, tmp_path / "a", data["train"], steps=4, reg=data["reg"], batch=1,
                          extra=extra))
    assert full.is_dir() and (full / "unet" / "diffusion_pytorch_model.bin").is_file()
    state = tmp_path / "a" / "db-step00000002-state"
    assert (state / "manifest.json").is_file()
    resumed = run_db(db_args(tiny_sd1_dir, tmp_path / "b", data["train"], steps=4, reg=data["reg"], batch=1,
                             extra=extra + ["--resume", str(state)]))
    for a, b in ((full, resumed), (tmp_path / "a" / "db-ema", tmp_path / "b" / "db-ema")):
        assert same(ldm_weights(a), ldm_weights(b))

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(full), safety_checker=None, local_files_only=True)
    trained = ldm_weights(full)
    from library.models.ldm_conversion import UNET_PREFIX, unet_diffusers_to_ldm

    unet = {UNET_PREFIX + k: v for k, v in unet_diffusers_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    assert same(part(unet, UNET), part(trained, UNET))


def test_fused_backward_pass_matches_the_plain_adafactor_step(tiny_sd1_dir, data, tmp_path):
    """AdaFactor stepping each parameter inside backward gives the weights of the usual step (no clipping)."""
    common = ["--optimizer_type", "AdaFactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
              "warmup_init=False", "--max_grad_norm", "0", "--save_model_as", "safetensors"]
    plain = run_db(db_args(tiny_sd1_dir, tmp_path / "a", data["train"], steps=2, extra=common))
    fused = run_db(db_args(tiny_sd1_dir, tmp_path / "b", data["train"], steps=2,
                           extra=common + ["--fused_backward_pass"]))
    a, b = ldm_weights(plain), ldm_weights(fused)
    base = ldm_weights(tiny_sd1_dir)
    assert not same(part(a, UNET), part(base, UNET)) and not same(part(a, TE), part(base, TE))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("extra, message", [
    (["--fused_backward_pass"], "works only with --optimizer_type AdaFactor"),
    (["--fused_backward_pass", "--optimizer_type", "AdaFactor", "--gradient_accumulation_steps", "2"],
     "gradient_accumulation_steps"),
    (["--use_8bit_adam"], "AdamW8bit"),
    (["--ema_decay", "0.9", "--ema_sigma_rel", "0.1"], "give only one"),
    (["--learning_rate_te", "1e-5", "--stop_text_encoder_training", "-1"], "does not train"),
    (["--no_token_padding", "--max_token_length", "150"], "--no_token_padding"),
    (["--cache_text_encoder_outputs"], r"^cannot start training: 1 problem\n.*--stop_text_encoder_training -1"),
])
def test_refused_options(tiny_sd1_dir, data, tmp_path, extra, message, hide_module):
    from library.errors import UserError

    hide_module("bitsandbytes")  # --use_8bit_adam without it (it is pinned, so installed in CI)

    with pytest.raises(UserError, match=message) as raised:
        run_db(db_args(tiny_sd1_dir, tmp_path / "out", data["train"], steps=1, extra=extra))
    assert "--network_" not in str(raised.value)  # no advice from train_network.py
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_fine_tuning_datasets_are_refused(tiny_sd1_dir, data, tmp_path):
    from library.errors import UserError

    meta = tmp_path / "meta.json"
    meta.write_text('{"img0": {"caption": "a dog"}}', encoding="utf-8")
    config = tmp_path / "data.toml"
    config.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nmetadata_file = '{meta.as_posix()}'\n"
                      f"image_dir = '{(data['train'] / '1_sks dog').as_posix()}'\n", encoding="utf-8")
    argv = ["--pretrained_model_name_or_path", str(tiny_sd1_dir), "--dataset_config", str(config),
            "--output_dir", str(tmp_path / "out")]
    with pytest.raises(UserError, match="train_db.py"):
        run_db(argv)


def test_no_token_padding_keeps_the_longest_caption_positions(tiny_sd1_dir):
    """The conditioning ends at the longest caption's EOS and equals the padded encoding there."""
    from library.models.loading import load_sd_models
    from library.models.text_encoding import TextEncoding
    from library.training.full_recipe import LongestCaptionText
    from library.training.text_cache import TextConditioner

    models = load_sd_models(argparse.Namespace(pretrained_model_name_or_path=str(tiny_sd1_dir)))
    encoding = TextEncoding(models.tokenizers[0], models.text_encoders[0])
    padded = TextConditioner(encoding, weighted=False, cache=False)
    captions = ["a photo of sks dog", "dog"]
    with torch.no_grad():
        full = padded(captions, torch.device("cpu"))
        short = LongestCaptionText(padded)(captions, torch.device("cpu"))
    assert full.shape[1] == 77 and short.shape[1] == 5 + 2
    assert torch.equal(short, full[:, :7])
    weighted = TextConditioner(encoding, weighted=True, cache=False)
    with torch.no_grad():
        short = LongestCaptionText(weighted)(["a (photo:1.2) of sks dog", "dog"], torch.device("cpu"))
    assert short.shape[1] == 7


def test_two_processes_stop_the_text_encoder_everywhere(tiny_sd1_dir, data, tmp_path):
    """Two CPU processes (torchrun; accelerate reads its environment): gradients are averaged across processes,
    and once the text encoder stops training no process updates it any more (not even with zero gradients and
    AdamW's decay)."""
    import os
    import subprocess
    import sys

    from tests.train_helpers import ROOT

    out = tmp_path / "out"
    argv = db_args(tiny_sd1_dir, out, data["train"], steps=2, reg=data["reg"], batch=1, extra=[
        "--stop_text_encoder_training", "1", "--save_every_n_steps", "1", "--save_model_as", "safetensors"])
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29000 + os.getpid() % 1000), str(ROOT / "train_db.py"), *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "per process with 2 process(es)" in done.stdout
    w = [ldm_weights(tiny_sd1_dir), ldm_weights(out / "db-step00000001.safetensors"),
         ldm_weights(out / "db.safetensors")]
    assert not same(part(w[0], TE), part(w[1], TE))
    assert same(part(w[1], TE), part(w[2], TE))
    assert not same(part(w[1], UNET), part(w[2], UNET))


def test_text_encoder_checkpointing_without_deprecation_warning():
    """transformers 5's gradient_checkpointing_enable warns (FutureWarning) on every run; the new name is used."""
    import warnings

    from library.models.tiny import build_tiny_components
    from library.training.preparation import enable_text_encoder_checkpointing

    te = build_tiny_components()["text_encoder"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enable_text_encoder_checkpointing(te)
    assert te.is_gradient_checkpointing


def test_dtype_moves_do_not_log_the_empty_float32_warning():
    """diffusers' ModelMixin.to warns "should be kept in float32: []" on every dtype cast; the loop's moves don't."""
    import logging

    from library.models.tiny import build_tiny_components
    from library.models.weights import move_module

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers.models.modeling_utils")
    logger.addHandler(handler)
    try:
        unet = build_tiny_components()["unet"]
        assert move_module(unet, "cpu", torch.bfloat16) is unet
        assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
        assert not [r for r in records if "kept in float32" in r.getMessage()]
        unet.to(torch.float32)  # the diffusers override, for comparison: the test sees its warning
        assert [r for r in records if "kept in float32" in r.getMessage()]
    finally:
        logger.removeHandler(handler)
