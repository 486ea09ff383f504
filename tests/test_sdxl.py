"""SDXL on the family seam: loading both on-disk formats, LoRA names equal to sd-scripts' on the real-size
architecture, sdxl_train_network.py end to end (UNet only, both text encoders, LoCon, cached text outputs,
resume, samples), diffusers applying our LoRA files, and the bad inputs refused before any model loads."""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from library.errors import UserError
from tests.train_helpers import ROOT, dreambooth_dir, load_lora, run_script

NAMES = ROOT / "tests" / "data" / "sdxl_lora_names_sd_scripts.json.gz"


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> dict[str, Path]:
    from library.models.tiny_sdxl import save_tiny_sdxl_diffusers_model, save_tiny_sdxl_single_file

    root = tmp_path_factory.mktemp("tiny_sdxl")
    return {"folder": save_tiny_sdxl_diffusers_model(root / "model"),
            "file": save_tiny_sdxl_single_file(root / "sdxl_tiny.safetensors"),
            "data": dreambooth_dir(root / "train", count=2)}


def sdxl_args(model: Path, out: Path, data: Path, *, steps: int = 2, extra: list[str] | None = None) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--output_dir", str(out), "--output_name", "lora",
            "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3", "--seed", "1",
            "--max_train_steps", str(steps), "--max_data_loader_n_workers", "0", "--train_data_dir", str(data),
            "--resolution", "64", "--train_batch_size", "2", *(extra or [])]


def run_sdxl(argv: list[str]) -> Path:
    import sdxl_train_network

    torch.set_num_threads(1)
    path = sdxl_train_network.main(argv)
    assert path is not None and path.is_file()
    return path


def _load(model: Path):
    from library.models.families import resolve_family

    args = argparse.Namespace(pretrained_model_name_or_path=str(model), v2=False, v_parameterization=False,
                              vae=None, tokenizer_cache_dir=None, max_token_length=None, clip_skip=None)
    family = resolve_family(args, ("sdxl",))
    return family.spec.load(args, family, device="cpu", dtype=torch.float32), args


# ------------------------------------------------------------------------------------------ names, tokenizers


def test_lora_names_are_sd_scripts_names_on_the_real_size_architecture():
    """722 UNet modules (+66 with conv_dim), 72 + 192 text-encoder modules, exactly sd-scripts' names."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from diffusers import UNet2DConditionModel

    from library.models.tiny_sdxl import sdxl_base_text_configs, sdxl_base_unet_config
    from networks import lora

    expected = json.loads(gzip.open(NAMES, "rt").read())
    c1, c2 = sdxl_base_text_configs()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_base_unet_config())
        tes = [CLIPTextModel(CLIPTextConfig(**c1)), CLIPTextModelWithProjection(CLIPTextConfig(**c2))]
        for kind, kwargs in (("plain", {}), ("conv", {"conv_dim": "4", "conv_alpha": "1"})):
            net = lora.create_network(1.0, 4, 1, None, tes, unet, **kwargs)
            ours = {m.lora_name for m in net.text_encoder_loras + net.unet_loras}
            # sd-scripts under transformers 5 drops text_model_ from TE1 names; the standard spelling keeps it
            assert ours == {lora.standard_key(n) for n in expected[kind]}
            assert len(net.unet_loras) == (722 if kind == "plain" else 788)
            assert sum(n.startswith("lora_te1_") for n in ours) == 72
            assert sum(n.startswith("lora_te2_") for n in ours) == 192
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in ours
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in ours


def test_bundled_clip_tokenizer_is_the_clip_vocabulary(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from library.models.tokenizers import SDXL_TOKENIZERS, load_clip_tokenizer

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    te1, te2 = (load_clip_tokenizer(spec, model_dir=tmp_path / "none") for spec in SDXL_TOKENIZERS)
    # the ids of openai/clip-vit-large-patch14 (and OpenCLIP's SimpleTokenizer) for this caption
    reference = [49406, 320, 1125, 539, 320, 2368, 49407]
    for tok in (te1, te2):
        assert tok("a photo of a cat").input_ids == reference
        assert tok("A PHOTO of a CAT!").input_ids[:6] == reference[:6]
    assert te1.pad_token_id == 49407 and te2.pad_token_id == 0
    padded = te2("a cat", padding="max_length", max_length=8).input_ids
    assert padded == [49406, 320, 2368, 49407, 0, 0, 0, 0]


# ------------------------------------------------------------------------------------------ loading


def test_single_file_and_folder_load_the_same_and_round_trip(tiny_sdxl):
    from safetensors.torch import load_file

    from library.models.sdxl_single_file import sdxl_ldm_state_dict

    folder, _ = _load(tiny_sdxl["folder"])
    single, args = _load(tiny_sdxl["file"])
    for a, b in zip([folder.unet, folder.vae, *folder.text_encoders], [single.unet, single.vae, *single.text_encoders]):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    saved = load_file(str(tiny_sdxl["file"]))
    again = sdxl_ldm_state_dict(single.unet, single.vae, single.text_encoders)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    # TE2's projection is stored as OpenCLIP multiplies (x @ P), the transpose of the nn.Linear weight
    p = saved["conditioner.embedders.1.model.text_projection"]
    assert torch.equal(p.t(), single.text_encoders[1].text_projection.weight)
    enc = single.family.spec.text_encoding(single, args)
    out = enc.encode(enc.tokenize(["sks thing", "a much longer caption"]))
    assert out["encoder_hidden_states"].shape == (2, 77, 80) and out["text_embeds"].shape == (2, 32)


@pytest.mark.parametrize("case, message", [
    ("sd1_to_sdxl", "use train_network.py"),
    ("sdxl_to_sd1", "use sdxl_train_network.py or sdxl_train.py"),
    ("truncated", "is it complete"),
    ("no_te2", "no text encoder 2"),
    ("v2", "remove --v2"),
])
def test_bad_inputs_are_one_message_before_any_model_loads(tiny_sdxl, tiny_sd1_dir, tmp_path, case, message):
    from safetensors.torch import load_file, save_file

    import train_network

    data, model, extra, main = tiny_sdxl["data"], tiny_sdxl["file"], [], run_sdxl
    if case == "sd1_to_sdxl":
        model = tiny_sd1_dir
    elif case == "sdxl_to_sd1":
        main = train_network.main
    elif case == "truncated":
        model = tmp_path / "cut.safetensors"
        whole = tiny_sdxl["file"].read_bytes()
        model.write_bytes(whole[: len(whole) * 2 // 3])  # the header is intact, the tensor data is not
    elif case == "no_te2":
        model = tmp_path / "no_te2.safetensors"
        save_file({k: v for k, v in load_file(str(tiny_sdxl["file"])).items()
                   if not k.startswith("conditioner.embedders.1.")}, str(model))
    else:
        extra = ["--v2"]
    with pytest.raises(UserError) as err:
        main(sdxl_args(model, tmp_path / "out", data, extra=extra))
    assert message in err.value.message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("script", ["sdxl_train_network", "sdxl_train"])
def test_8bit_optimizers_without_bitsandbytes_are_one_message_before_any_model_loads(tiny_sdxl, tmp_path, script,
                                                                                     hide_module):
    import importlib as imp

    hide_module("bitsandbytes")
    main = imp.import_module(script).main
    argv = ["--pretrained_model_name_or_path", str(tiny_sdxl["file"]), "--output_dir", str(tmp_path / "out"),
            "--train_data_dir", str(tiny_sdxl["data"]), "--resolution", "64", "--max_train_steps", "1",
            "--use_8bit_adam"]
    with pytest.raises(UserError) as err:
        main(argv)
    assert "pip install bitsandbytes==" in str(err.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ training


def test_unet_only_lora_from_the_single_file_applies_in_diffusers(tiny_sdxl, tmp_path):
    """A UNet-only LoRA trained from the single file: SGM names, SDXL metadata, a sample image; diffusers'
    StableDiffusionXLPipeline.load_lora_weights + fuse gives the weights of our own merge."""
    from diffusers import StableDiffusionXLPipeline

    from networks import lora

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks thing --w 64 --h 64 --s 2 --d 3\n", encoding="utf-8")
    final = run_sdxl(sdxl_args(tiny_sdxl["file"], tmp_path / "out", tiny_sdxl["data"], extra=[
        "--network_train_unet_only", "--cache_latents", "--sample_prompts", str(prompts),
        "--sample_every_n_steps", "2", "--save_every_n_steps", "1"]))
    tensors, meta = load_lora(final)
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert len(list((tmp_path / "out" / "sample").glob("*.png"))) == 1
    import lora_post_hoc_ema  # merges SDXL LoRA checkpoints like any other

    merged = tmp_path / "ema.safetensors"
    step1, _ = load_lora(tmp_path / "out" / "lora-step00000001.safetensors")
    assert lora_post_hoc_ema.main([str(tmp_path / "out" / "lora-step00000001.safetensors"), str(final), "--no_sort",
                                   "--beta", "0.5", "--output_file", str(merged)]) == 0
    averaged, _ = load_lora(merged)
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"
    assert torch.allclose(averaged[key], 0.5 * step1[key] + 0.5 * tensors[key], atol=1e-6)
    for k in [k for k in tensors if k.endswith("lora_up.weight")][:3]:
        tensors[k].normal_()  # trained ups are tiny after 2 steps; make the delta large enough to see

    from safetensors.torch import save_file

    strong = tmp_path / "strong.safetensors"
    save_file(tensors, str(strong))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl["folder"]), local_files_only=True)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(strong))
    pipe.fuse_lora()
    theirs = pipe.unet.state_dict()
    ours_models, _ = _load(tiny_sdxl["folder"])
    network, weights = lora.create_network_from_weights(1.0, str(strong), None, ours_models.text_encoders,
                                                        ours_models.unet, for_inference=True)
    network.merge_to(ours_models.text_encoders, ours_models.unet, weights, torch.float32, "cpu")
    ours = ours_models.unet.state_dict()
    changed = [k for k in ours if not torch.equal(ours[k], before[k])]
    assert len(changed) == len({k.split(".")[0] for k in tensors})
    for k in ours:
        head, _, leaf = k.rpartition(".")
        key = k if k in theirs else f"{head}.base_layer.{leaf}"
        assert torch.allclose(ours[k], theirs[key], atol=1e-6), k


def test_both_text_encoders_locon_and_two_text_encoder_lrs(tiny_sdxl, tmp_path):
    final = run_sdxl(sdxl_args(tiny_sdxl["folder"], tmp_path / "out", tiny_sdxl["data"], extra=[
        "--network_args", "conv_dim=2", "conv_alpha=1", "--text_encoder_lr", "1e-3", "5e-4",
        "--max_token_length", "150", "--clip_skip", "2"]))
    tensors, meta = load_lora(final)
    names = {k.split(".")[0] for k in tensors}
    assert any(n.startswith("lora_te1_text_model_encoder_layers_") for n in names)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_") for n in names)
    assert "lora_unet_input_blocks_1_0_in_layers_2" in names  # LoCon on a 3x3 ResNet conv
    assert tensors["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape[-1] == 3
    assert meta["ss_network_args"] == json.dumps({"conv_dim": "2", "conv_alpha": "1"})


def test_cached_text_outputs_train_like_uncached_ones(tiny_sdxl, tmp_path):
    """The text cache (to disk) holds the hidden states and the pooled output: the same LoRA as encoding every
    step (--enable_wildcard makes captions variable, so nothing is cached there)."""
    cached = run_sdxl(sdxl_args(tiny_sdxl["folder"], tmp_path / "a", tiny_sdxl["data"], steps=1, extra=[
        "--network_train_unet_only", "--cache_text_encoder_outputs_to_disk"]))
    files = list((tmp_path / "a" / ".cache" / "text_encoder_outputs").glob("*.safetensors"))
    assert len(files) == 2
    from safetensors.torch import load_file

    assert set(load_file(str(files[0]))) == {"cond.encoder_hidden_states", "cond.text_embeds"}
    uncached = run_sdxl(sdxl_args(tiny_sdxl["folder"], tmp_path / "b", tiny_sdxl["data"], steps=1, extra=[
        "--network_train_unet_only", "--enable_wildcard"]))
    a, _ = load_lora(cached)
    b, _ = load_lora(uncached)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_bit_exact(tiny_sdxl, tmp_path):
    extra = ["--save_state", "--save_every_n_steps", "1", "--noise_offset", "0.05"]
    full = run_script(sdxl_args(tiny_sdxl["file"], tmp_path / "a", tiny_sdxl["data"], steps=2, extra=extra),
                      script="sdxl_train_network.py")
    assert full.returncode == 0, full.stderr[-3000:]
    resumed = run_script(sdxl_args(tiny_sdxl["file"], tmp_path / "b", tiny_sdxl["data"], steps=2, extra=extra + [
        "--resume", str(tmp_path / "a" / "lora-step00000001-state")]), script="sdxl_train_network.py")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "steps:  50%" in resumed.stderr  # the progress bar starts at step 1 of 2: it did resume
    a, _ = load_lora(tmp_path / "a" / "lora.safetensors")
    b, _ = load_lora(tmp_path / "b" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes(tiny_sdxl, tmp_path):
    """2-process DDP (CPU gloo): each process its share of the batches, one LoRA file with SDXL names."""
    data = dreambooth_dir(tmp_path / "train", count=4)
    argv = sdxl_args(tiny_sdxl["file"], tmp_path / "out", data, steps=1, extra=["--network_train_unet_only"])
    argv[argv.index("--train_batch_size") + 1] = "1"
    proc = run_script(argv, processes=2, script="sdxl_train_network.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tensors, meta = load_lora(tmp_path / "out" / "lora.safetensors")
    assert "lora_unet_middle_block_1_proj_in.lora_down.weight" in tensors
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"


# ------------------------------------------------------------------------------------------ samples


def test_every_sd_sampler_makes_sdxl_samples_with_size_conditioning_from_w_h(tiny_sdxl, tmp_path):
    """Each sampler SD1.x has renders with the SDXL denoiser; the size ids are the prompt's --h/--w (no crop)."""
    import numpy as np
    from PIL import Image

    from library.training.sampling import SAMPLERS, SamplePrompt, _as_conditioning, generate_samples

    models, args = _load(tiny_sdxl["file"])
    encoding = models.family.spec.text_encoding(models, args)
    text_encode = lambda texts: encoding.encode(encoding.tokenize(texts))  # noqa: E731
    cond = _as_conditioning(text_encode(["a cat"]), models.family.spec, (96, 64), torch.device("cpu"))
    assert cond["time_ids"].tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]
    seen: list[torch.Tensor] = []
    hook = models.unet.add_embedding.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    try:
        for i, sampler in enumerate(SAMPLERS):
            if sampler in ("lms", "k_lms") and importlib.util.find_spec("scipy") is None:
                continue  # LMS needs scipy (refused with a message without it, see test_sampling.py)
            prompt = SamplePrompt(prompt="a cat", index=i, seed=3, sample_steps=2, width=96, height=64, scale=2.0,
                                  negative_prompt="blurry")
            path = generate_samples(
                unet=models.unet, vae=models.vae, text_encode=text_encode, prompts=[prompt], output_dir=tmp_path,
                output_name=sampler, tag="000001", default_size=(64, 64), device="cpu", dtype=torch.float32,
                v_parameterization=False, latent_scale=models.family.latent_scale, sampler=sampler,
                spec=models.family.spec)[0]
            with Image.open(path) as image:
                assert image.size == (96, 64), sampler
                assert np.asarray(image).std() > 0, sampler
    finally:
        hook.remove()
    time_dim = models.unet.config.addition_time_embed_dim
    assert seen and all(x.shape[0] == 2 for x in seen)  # guidance: conditional and unconditional rows
    assert seen[0].shape[1] == models.unet.config.projection_class_embeddings_input_dim
    assert seen[0].shape[1] - 6 * time_dim == models.text_encoders[1].config.projection_dim
