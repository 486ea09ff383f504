"""Sample prompt files (all formats and their errors), samplers, and image generation with a tiny model."""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.models.tiny import TinyConfig, build_tiny_components, write_clip_tokenizer
from library.training.sampling import (
    SAMPLERS, SamplePrompt, add_sampling_arguments, generate_samples, load_sample_prompts, make_sample_scheduler,
    prompts_for_process, sample_tag, sampling_due, validate_sampling_args,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    return parser.parse_args(list(argv))


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_prompts(tmp_path):
    path = write(tmp_path, "p.txt", (
        "# prompt 1\n"
        "masterpiece, 1girl, upper body --n low quality, worst quality --w 768 --h 770 --d 1 --l 5.5 --s 28\n"
        "\n"
        "  a photo of a cat --ss euler_a --d 2\n"
        "plain prompt --W 640 --H 384\n"
    ))
    p = load_sample_prompts(path)
    assert len(p) == 3
    assert p[0] == SamplePrompt(prompt="masterpiece, 1girl, upper body", index=0,
                                negative_prompt="low quality, worst quality", width=768, height=770, seed=1,
                                scale=5.5, sample_steps=28)
    assert p[0].size((512, 512)) == (768, 768)
    assert (p[1].prompt, p[1].sampler, p[1].seed, p[1].index) == ("a photo of a cat", "euler_a", 2, 1)
    assert p[2].size((512, 512)) == (640, 384) and p[2].seed is None and p[2].scale == 7.5
    assert p[2].sample_steps == 30
    assert SamplePrompt(prompt="x", width=20, height=100).size((0, 0)) == (64, 96)


def test_toml_prompts(tmp_path):
    path = write(tmp_path, "p.toml", (
        "[prompt]\nsample_steps = 20\nwidth = 512\nheight = 512\nscale = 7\nnegative_prompt = \"blurry\"\n\n"
        "[[prompt.subset]]\nprompt = \"a dog\"\nseed = 3\n\n"
        "[[prompt.subset]]\nprompt = \"a cat\"\nwidth = 768\nsample_sampler = \"k_euler\"\n"
    ))
    p = load_sample_prompts(path)
    assert [x.prompt for x in p] == ["a dog", "a cat"]
    assert (p[0].sample_steps, p[0].negative_prompt, p[0].seed, p[0].scale) == (20, "blurry", 3, 7.0)
    assert (p[1].width, p[1].height, p[1].sampler, p[1].index) == (768, 512, "k_euler", 1)


def test_json_prompts(tmp_path):
    path = write(tmp_path, "p.json", json.dumps([
        {"prompt": "a dog", "width": 640, "seed": 5, "sample_steps": 12},
        {"prompt": "a cat", "negative_prompt": "ugly", "scale": 4.0},
    ]))
    p = load_sample_prompts(path)
    assert (p[0].width, p[0].height, p[0].seed, p[0].sample_steps) == (640, None, 5, 12)
    assert (p[1].negative_prompt, p[1].scale) == ("ugly", 4.0)


@pytest.mark.parametrize("name, text, fragment", [
    ("a.txt", "ok\nbad --w abc\n", r"a\.txt:2: width must be an integer"),
    ("b.txt", "# c\n\nbad --x 3\n", r"b\.txt:3: unknown option --x"),
    ("c.txt", "bad --s 5000\n", r"c\.txt:1: sample_steps must be between 1 and 1000"),
    ("d.txt", "bad --ss eulr\n", r"did you mean euler"),
    ("e.txt", "# only comments\n", r"no prompts found"),
    ("f.json", "[{\"prompt\": \"x\", \"widht\": 5}]", r"entry #1: unknown key 'widht' \(did you mean width\?\)"),
    ("g.json", "{\"prompt\": \"x\"}", r"expected a list"),
    ("h.json", "[{\"prompt\": \"x\",}]", r"invalid JSON at line 1"),
    ("i.toml", "[prompt]\nwidth = 5\n", r"\[\[prompt.subset\]\]"),
    ("j.toml", "[prompt]\n[[prompt.subset]]\nprompt = \"x\"\n[[prompt.subset]]\nseed = 1.5\nprompt = \"y\"\n",
     r"subset\]\] #2: seed must be an integer"),
    ("k.yaml", "x", r"unsupported file type"),
    ("l.txt", " --n only negative\n", r"l\.txt:1: the prompt is empty"),
])
def test_prompt_file_errors_name_file_and_line(tmp_path, name, text, fragment):
    with pytest.raises(UserError) as err:
        load_sample_prompts(write(tmp_path, name, text))
    assert re.search(fragment, err.value.message), err.value.message


def test_other_model_options_are_ignored(tmp_path):
    p = load_sample_prompts(write(tmp_path, "p.txt", "a cat --g 3.5 --fs 3 --w 512\n"))
    assert p[0].width == 512 and p[0].prompt == "a cat"


def test_missing_file_and_validation(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_sample_prompts(tmp_path / "nope.txt")
    assert validate_sampling_args(parse()) == []
    with pytest.raises(UserError, match="--sample_prompts is missing"):
        validate_sampling_args(parse("--sample_every_n_steps", "10"))
    with pytest.raises(UserError, match="0 turns it off"):
        validate_sampling_args(parse("--sample_every_n_epochs", "-1"))
    assert validate_sampling_args(parse("--sample_every_n_epochs", "0")) == []
    path = write(tmp_path, "p.txt", "a cat\n")
    assert len(validate_sampling_args(parse("--sample_at_first", "--sample_prompts", str(path)))) == 1


def test_triggers_and_tags():
    a = parse("--sample_every_n_steps", "10")
    assert [s for s in range(0, 31) if sampling_due(a, step=s)] == [10, 20, 30]
    assert not sampling_due(a, step=10, epoch=1)
    both = parse("--sample_every_n_steps", "10", "--sample_every_n_epochs", "2", "--sample_at_first")
    assert not sampling_due(both, step=10) and sampling_due(both, step=0)
    assert sampling_due(both, step=37, epoch=2) and not sampling_due(both, step=37, epoch=3)
    assert not sampling_due(parse(), step=0)
    assert sample_tag(step=100) == "000100" and sample_tag(step=5, epoch=1) == "e000001"
    prompts = [SamplePrompt(prompt=str(i), index=i) for i in range(5)]
    assert [p.index for p in prompts_for_process(prompts, 1, 2)] == [1, 3]


def test_sampler_names():
    assert parse().sample_sampler == "ddim"
    for name in SAMPLERS:
        if name in ("lms", "k_lms") and importlib.util.find_spec("scipy") is None:
            with pytest.raises(UserError, match="pip install scipy=="):
                make_sample_scheduler(name, False)
            continue
        s = make_sample_scheduler(name, v_parameterization=True)
        assert s.config.prediction_type == "v_prediction" and s.config.num_train_timesteps == 1000
    assert make_sample_scheduler("dpmsolver++", False).config.algorithm_type == "dpmsolver++"
    z = make_sample_scheduler("ddim", True, zero_terminal_snr=True)
    assert z.alphas_cumprod[-1].item() < 1e-6 and z.config.timestep_spacing == "trailing"




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import CLIPTokenizer

    parts = build_tiny_components(TinyConfig(), seed=0)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))

    def text_encode(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return parts["text_encoder"](ids).last_hidden_state

    parts["text_encode"] = text_encode
    return parts


def run(tiny, out, prompts, tag="000010", **kw):
    opts = dict(unet=tiny["unet"], vae=tiny["vae"], text_encode=tiny["text_encode"], prompts=prompts,
                output_dir=out, output_name="mylora", tag=tag, default_size=(128, 64), device="cpu",
                dtype=torch.float32, v_parameterization=False, latent_scale=0.18215)
    opts.update(kw)
    return generate_samples(**opts)


def test_generate_writes_pngs_and_restores_rng(tiny, tmp_path):
    prompts = [
        SamplePrompt(prompt="a cat", index=0, seed=7, sample_steps=3),
        SamplePrompt(prompt="a dog", index=1, width=64, height=128, sample_steps=2, scale=1.0, sampler="euler_a",
                     negative_prompt="blurry"),
    ]
    random.seed(123)
    torch.manual_seed(123)
    np.random.seed(123)
    states = (random.getstate(), torch.get_rng_state(), np.random.get_state())
    tiny["unet"].train()
    tiny["vae"].eval()
    paths = run(tiny, tmp_path, prompts)
    assert tiny["unet"].training and not tiny["vae"].training
    after = (random.random(), torch.rand(1).item(), np.random.rand())
    random.setstate(states[0])
    torch.set_rng_state(states[1])
    np.random.set_state(states[2])
    assert after == (random.random(), torch.rand(1).item(), np.random.rand())

    assert len(paths) == 2 and all(p.parent == tmp_path / "sample" for p in paths)
    assert re.fullmatch(r"mylora_000010_00_\d{14}_7\.png", paths[0].name)
    assert re.fullmatch(r"mylora_000010_01_\d{14}\.png", paths[1].name)
    with Image.open(paths[0]) as a, Image.open(paths[1]) as b:
        assert a.size == (128, 64) and b.size == (64, 128) and a.format == "PNG"
    assert not list((tmp_path / "sample").glob(".*.tmp"))


def test_seeded_samples_are_reproducible(tiny, tmp_path):
    p = [SamplePrompt(prompt="a cat", index=0, seed=11, sample_steps=2, width=64, height=64)]
    a = run(tiny, tmp_path / "a", p, v_parameterization=True)[0]
    b = run(tiny, tmp_path / "b", p, v_parameterization=True)[0]
    c = run(tiny, tmp_path / "c", [SamplePrompt(prompt="a cat", index=0, seed=12, sample_steps=2, width=64,
                                                height=64)], v_parameterization=True)[0]
    arr = [np.asarray(Image.open(x)) for x in (a, b, c)]
    assert np.array_equal(arr[0], arr[1]) and not np.array_equal(arr[0], arr[2])


@pytest.mark.parametrize("sampler", ["dpmsolver++", "heun", "k_dpm_2_a", "pndm"])
def test_other_samplers_generate(tiny, tmp_path, sampler):
    p = [SamplePrompt(prompt="a cat", index=3, seed=1, sample_steps=3, width=64, height=64)]
    path = run(tiny, tmp_path, p, sampler=sampler, output_name=None, tag="e000002")[0]
    assert re.fullmatch(r"e000002_03_\d{14}_1\.png", path.name)
    assert np.asarray(Image.open(path)).std() > 0


def test_long_prompt_embeddings_of_different_lengths(tiny, tmp_path):
    """A long prompt (two 75-token chunks) and a short negative prompt still get guidance."""
    base = tiny["text_encode"]

    def text_encode(texts: list[str]) -> torch.Tensor:
        emb = base(texts)
        return torch.cat([emb, emb[:, 1:-1]], dim=1) if "long" in texts[0] else emb

    p = [SamplePrompt(prompt="a long prompt", index=0, seed=3, sample_steps=2, width=64, height=64, scale=5.0)]
    path = run(dict(tiny, text_encode=text_encode), tmp_path, p)[0]
    assert Image.open(path).size == (64, 64)
