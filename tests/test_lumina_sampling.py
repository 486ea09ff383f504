"""Lumina samples with sd-scripts' prompt keys ``--ctr`` (cfg_trunc_ratio) and ``--rcfg`` (renorm_cfg): read from
every prompt-file format, and each changes the image the way sd-scripts' sampler does."""

from __future__ import annotations

import logging

import pytest
import torch

from library.errors import UserError
from library.models.lumina.tiny import save_tiny_lumina_files
from library.training.sampling import load_sample_prompts, warn_unread_prompt_keys
from train_helpers import dataset_toml, make_images, prepare_run, train_args


def test_prompt_files_give_cfg_trunc_ratio_and_renorm_cfg(tmp_path):
    from library.models.lumina.sampling import _settings

    txt = tmp_path / "p.txt"
    txt.write_text("a cat --ctr 0.5 --rcfg 0\na dog --l 2\n", encoding="utf-8")
    cat, dog = load_sample_prompts(txt)
    assert (cat.cfg_trunc_ratio, cat.renorm_cfg) == (0.5, 0.0)
    assert _settings(cat) == (36, 3.5, 0.5, 0.0) and _settings(dog) == (36, 2.0, 0.25, 1.0)  # sd-scripts' defaults
    toml = tmp_path / "p.toml"
    toml.write_text('[prompt]\ncfg_trunc_ratio = 1.0\n[[prompt.subset]]\nprompt = "a"\nrenorm_cfg = 2.5\n',
                    encoding="utf-8")
    (only,) = load_sample_prompts(toml)
    assert (only.cfg_trunc_ratio, only.renorm_cfg) == (1.0, 2.5)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "a", "cfg_trunc_ratio": 1.5}]', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.json: entry #1: cfg_trunc_ratio must be between 0 and 1"):
        load_sample_prompts(bad)


def test_other_families_say_they_ignore_the_lumina_keys(tmp_path, caplog):
    from library.models.families.registry import family_spec

    txt = tmp_path / "p.txt"
    txt.write_text("a cat --ctr 0.5\n", encoding="utf-8")
    prompts = load_sample_prompts(txt)
    with caplog.at_level(logging.WARNING):
        assert warn_unread_prompt_keys(prompts, family_spec("lumina").sample_prompt_keys, "lumina2") == []
        assert warn_unread_prompt_keys(prompts, family_spec("sd3").sample_prompt_keys, "sd3-medium") == [
            "cfg_trunc_ratio"]
    assert "cfg_trunc_ratio is not used by sd3-medium samples; ignored" in caplog.text


def test_truncation_and_renormalisation_change_the_samples(tmp_path):
    from library.models.lumina.recipe import LuminaLoRARecipe
    from library.models.lumina.sampling import _denoise_batch

    files = save_tiny_lumina_files(tmp_path / "model", seed=0)
    data = dataset_toml(tmp_path / "data.toml", make_images(tmp_path / "images", count=2), resolution=64)
    argv = train_args(files["lumina"], tmp_path / "out", config=data, steps=1) + [
        "--tokenizer_cache_dir", str(files["tokenizer_cache_dir"]), "--gemma2_max_token_length", "16",
        "--gemma2", str(files["gemma2"]), "--ae", str(files["ae"])]
    run = prepare_run(argv, script="lumina_train_network", recipe=LuminaLoRARecipe, families=("lumina",))
    prompts = tmp_path / "prompts.txt"
    options = ["--l 1", "", "--ctr 0", "--ctr 1", "--ctr 1 --rcfg 0", "--ctr 1 --rcfg 0.5"]
    prompts.write_text("".join(f"a red cat --n a dog --w 64 --h 64 --d 5 --s 4 --l 6 {o}\n" for o in options),
                       encoding="utf-8")
    with torch.no_grad():
        images = {o: _denoise_batch(run, [p], (64, 64)) for o, p in zip(options, load_sample_prompts(prompts))}
    no_guidance, default, never, always, uncapped, capped = images.values()
    assert torch.equal(never, no_guidance)  # cfg_trunc_ratio 0: no step is guided
    for a, b in ((default, no_guidance), (always, default), (uncapped, always), (capped, always)):
        assert (a - b).abs().max() > 1e-3
