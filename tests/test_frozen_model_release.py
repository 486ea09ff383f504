"""Frozen models a LoRA run no longer needs are released: the text encoders once every caption's outputs are
cached (also when the cache was not asked for, if it is smaller than the encoders), the VAE once the latents are;
and the command-line wrapper keeps the libraries' import-time objects away from the garbage collector."""

from __future__ import annotations

import argparse
import gc

import pytest
import torch

from tests.train_helpers import dataset_toml, load_lora, make_images, prepare_run, run_main, train_args


@pytest.fixture
def data(tmp_path):
    return dataset_toml(tmp_path / "data.toml", make_images(tmp_path / "images", count=2))


def _on_meta(module: torch.nn.Module) -> bool:
    return all(p.device.type == "meta" for p in module.parameters())


def test_unasked_text_cache_frees_the_encoders_and_trains_the_same(tiny_sd1_dir, data, tmp_path):
    """Fixed captions and a frozen text encoder: the outputs are cached and the encoder freed without
    --cache_text_encoder_outputs. A run that must keep the encoder (sample prompts) trains the same weights."""
    extra = ["--network_train_unet_only", "--cache_latents"]
    run = prepare_run(train_args(tiny_sd1_dir, tmp_path / "probe", config=data, extra=extra))
    assert run.text.cache and run.text.encoders_released
    assert all(_on_meta(te) for te in run.models.text_encoders) and _on_meta(run.models.vae)
    caption = run.group.fixed_captions()[0]
    assert run.text([caption], torch.device("cpu")).shape[1] == 77  # served from the cache
    with pytest.raises(RuntimeError, match="not in the text-encoder cache"):
        run.text(["a caption the run never saw"], torch.device("cpu"))

    released = run_main(train_args(tiny_sd1_dir, tmp_path / "a", config=data, steps=3, extra=extra))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo --w 64 --h 64 --s 2\n", encoding="utf-8")
    sampling = extra + ["--sample_prompts", str(prompts), "--sample_every_n_steps", "10"]  # due after the run
    probe = prepare_run(train_args(tiny_sd1_dir, tmp_path / "probe2", config=data, extra=sampling))
    assert probe.text.cache and not probe.text.encoders_released
    assert not any(_on_meta(te) for te in probe.models.text_encoders)
    kept = run_main(train_args(tiny_sd1_dir, tmp_path / "b", config=data, steps=3, extra=sampling))
    a, b = load_lora(released)[0], load_lora(kept)[0]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if k.endswith("lora_up.weight"))


def test_a_text_cache_larger_than_the_encoders_is_not_kept(tiny_sd1_dir):
    """Unasked caching stops when the projected cache outgrows its budget: nothing stays cached and every
    call encodes again; within the budget every caption is cached."""
    from library.models.loading import load_sd_models
    from library.models.text_encoding import TextEncoding
    from library.models.weights import module_bytes
    from library.training.text_cache import TextConditioner

    models = load_sd_models(argparse.Namespace(pretrained_model_name_or_path=str(tiny_sd1_dir)))
    encoding = TextEncoding(models.tokenizers[0], models.text_encoders[0])
    captions = [f"caption {i}" for i in range(10)]
    entry = 77 * models.text_encoders[0].config.hidden_size * 4  # one float32 output row
    assert module_bytes(models.text_encoders[0]) > 10 * entry

    small = TextConditioner(encoding, weighted=False, cache=True)
    assert not small.fill(captions, torch.device("cpu"), batch_size=4, budget_bytes=10 * entry - 1)
    assert not small.cache and small.nbytes() == 0 and small.encoded == 4  # stopped after the first batch
    small(captions[:2], torch.device("cpu"))
    assert small.encoded == 6 and small.nbytes() == 0

    fits = TextConditioner(encoding, weighted=False, cache=True)
    assert fits.fill(captions, torch.device("cpu"), batch_size=4, budget_bytes=10 * entry)
    assert fits.cache and fits.nbytes() == 10 * entry and fits.encoded == 10
    with torch.no_grad():
        assert torch.equal(fits(captions[:2], torch.device("cpu")), small(captions[:2], torch.device("cpu")))
    assert fits.encoded == 10


def test_run_cli_freezes_the_objects_alive_at_start_and_exit():
    from library.errors import UserError, run_cli

    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as done:
            run_cli(lambda: 0)
        assert done.value.code == 0 and gc.get_freeze_count() > 0
        gc.unfreeze()

        def fails() -> int:
            raise UserError("bad flag")

        with pytest.raises(SystemExit) as done:
            run_cli(fails)
        assert done.value.code == 2 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
