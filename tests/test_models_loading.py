"""Loading tiny SD1/SD2 models from diffusers folders and single files."""

from __future__ import annotations

import argparse
import hashlib

import pytest
import torch

from library.errors import UserError
from library.models.loading import SDModels, load_sd_models
from library.models.tiny import TinyConfig, build_tiny_components


def _args(path, **kw) -> argparse.Namespace:
    return argparse.Namespace(pretrained_model_name_or_path=str(path), **kw)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def assert_same_models(a: SDModels, b: SDModels) -> None:
    assert a.family == b.family
    assert_same_weights(a.unet, b.unet)
    assert_same_weights(a.vae, b.vae)
    assert_same_weights(a.text_encoders[0], b.text_encoders[0])
    for key in ("block_out_channels", "attention_head_dim", "cross_attention_dim", "use_linear_projection",
                "layers_per_block", "norm_num_groups", "sample_size", "down_block_types", "up_block_types"):
        assert _plain(a.unet.config[key]) == _plain(b.unet.config[key]), key
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor"):
        assert _plain(a.vae.config[key]) == _plain(b.vae.config[key]), key
    ta, tb = a.text_encoders[0].config, b.text_encoders[0].config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act"):
        assert getattr(ta, key) == getattr(tb, key), key


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("sd2", [False, True])
def test_diffusers_folder_loads_the_saved_weights(sd2, tiny_sd1_dir, tiny_sd2_dir):
    folder = tiny_sd2_dir if sd2 else tiny_sd1_dir
    models = load_sd_models(_args(folder, v2=sd2))
    reference = build_tiny_components(TinyConfig(sd2=sd2))
    assert_same_weights(models.unet, reference["unet"])
    assert_same_weights(models.vae, reference["vae"])
    assert_same_weights(models.text_encoders[0], reference["text_encoder"])
    assert models.family.name == ("sd2" if sd2 else "sd1")
    assert models.tokenizers[0].pad_token_id == (0 if sd2 else 49407)
    assert models.model_hashes == {}
    assert all(p.device.type == "cpu" for p in models.unet.parameters())
    sched = models.noise_scheduler()
    assert sched.config.prediction_type == "epsilon" and sched.config.num_train_timesteps == 1000
    assert sched.config.beta_schedule == "scaled_linear" and not sched.config.clip_sample


def test_dtype_and_v_parameterization(tiny_sd2_dir, caplog):
    with caplog.at_level("WARNING", logger="library.models.loading"):
        models = load_sd_models(_args(tiny_sd2_dir, v2=True, v_parameterization=True), dtype=torch.bfloat16)
    assert "prediction_type=epsilon but training uses v_prediction" in caplog.text
    assert models.unet.dtype == torch.bfloat16 and models.text_encoders[0].dtype == torch.bfloat16
    assert models.family.base_model_version == "sd_v2_v"
    assert models.family.modelspec_architecture == "stable-diffusion-v2-768-v"
    assert models.noise_scheduler().config.prediction_type == "v_prediction"
    # ss_base_model_version as sd-scripts writes it: sd_v1 / sd_v2, "_v" added for v-prediction
    from library.models.family import sd_family

    versions = [sd_family(v2, v).base_model_version for v2 in (False, True) for v in (False, True)]
    assert versions == ["sd_v1", "sd_v1_v", "sd_v2", "sd_v2_v"]


def test_v2_flag_mismatch_is_an_error(tiny_sd1_dir, tiny_sd2_dir):
    with pytest.raises(UserError, match="add --v2|Add --v2"):
        load_sd_models(_args(tiny_sd2_dir))
    with pytest.raises(UserError, match="Remove --v2"):
        load_sd_models(_args(tiny_sd1_dir, v2=True))


def test_path_errors_before_loading(tmp_path, tiny_sd1_dir):
    with pytest.raises(UserError, match="not found"):
        load_sd_models(_args(tmp_path / "missing.safetensors"))
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(UserError, match="unsupported model file type"):
        load_sd_models(_args(tmp_path / "model.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a diffusers model"):
        load_sd_models(_args(tmp_path / "empty"))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="broken.safetensors: cannot read"):
        load_sd_models(_args(tmp_path / "broken.safetensors"))
    (tmp_path / "broken.ckpt").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="broken.ckpt: cannot read"):
        load_sd_models(_args(tmp_path / "broken.ckpt", tokenizer_cache_dir=str(tiny_sd1_dir)))
    with pytest.raises(UserError, match="required"):
        load_sd_models(argparse.Namespace(pretrained_model_name_or_path=None))


def test_hub_id_offline_says_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as err:
        load_sd_models(_args("someone/not-cached-model"))
    assert "HF_HUB_OFFLINE" in err.value.message and "hf download someone/not-cached-model" in err.value.message


# ------------------------------------------------------------------------------------------ single files

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _independent_sd1_ldm(parts) -> dict[str, torch.Tensor]:
    """Tiny SD1 (1 layer per level, attention on levels 0-2) in the LDM layout, mapped with plain regexes."""
    import re

    out = {}
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2"}
    patterns = [
        (r"down_blocks\.(\d)\.resnets\.0\.(.*)", lambda m: (f"input_blocks.{1 + 2 * int(m[1])}.0", m[2])),
        (r"down_blocks\.(\d)\.attentions\.0\.(.*)", lambda m: (f"input_blocks.{1 + 2 * int(m[1])}.1", m[2])),
        (r"down_blocks\.(\d)\.downsamplers\.0\.conv\.(.*)", lambda m: (f"input_blocks.{2 + 2 * int(m[1])}.0.op", m[2])),
        (r"up_blocks\.(\d)\.resnets\.(\d)\.(.*)", lambda m: (f"output_blocks.{2 * int(m[1]) + int(m[2])}.0", m[3])),
        (r"up_blocks\.(\d)\.attentions\.(\d)\.(.*)", lambda m: (f"output_blocks.{2 * int(m[1]) + int(m[2])}.1", m[3])),
        (r"up_blocks\.(\d)\.upsamplers\.0\.conv\.(.*)",
         lambda m: (f"output_blocks.{2 * int(m[1]) + 1}.{1 if m[1] == '0' else 2}.conv", m[2])),
    ]
    for key, value in parts["unet"].state_dict().items():
        module, rest = next(((dst, key[len(src) + 1:]) for src, dst in fixed.items() if key.startswith(src + ".")),
                            (None, None))
        for pattern, build in patterns:
            if module is None and (m := re.fullmatch(pattern, key)):
                module, rest = build(m)
        if ".resnets." in key:
            name = rest.split(".")[0]
            rest = _RESNET_TO_LDM.get(name, name) + rest[len(name):]
        out[f"model.diffusion_model.{module}.{rest}"] = value
    vae_fixed = {"mid_block.resnets.0": "mid.block_1", "mid_block.resnets.1": "mid.block_2",
                 "mid_block.attentions.0": "mid.attn_1", "conv_norm_out": "norm_out"}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in parts["vae"].state_dict().items():
        new = key
        for src, dst in vae_fixed.items():
            new = new.replace("." + src + ".", "." + dst + ".")
        new = re.sub(r"encoder\.down_blocks\.(\d)\.resnets\.(\d)", r"encoder.down.\1.block.\2", new)
        new = re.sub(r"encoder\.down_blocks\.(\d)\.downsamplers\.0", r"encoder.down.\1.downsample", new)
        new = re.sub(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)",
                     lambda m: f"decoder.up.{3 - int(m[1])}.block.{m[2]}", new)
        new = re.sub(r"decoder\.up_blocks\.(\d)\.upsamplers\.0", lambda m: f"decoder.up.{3 - int(m[1])}.upsample", new)
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in new:
            for src, dst in attn.items():
                new = new.replace(".attn_1." + src + ".", ".attn_1." + dst + ".")
            if value.ndim == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    for key, value in parts["text_encoder"].state_dict().items():
        out["cond_stage_model.transformer.text_model." + key] = value
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    out["alphas_cumprod"] = torch.ones(1000)  # LDM schedule buffers are ignored
    return out


def test_independently_mapped_ldm_file_loads_with_identical_weights(tmp_path, tiny_sd1_dir):
    from safetensors.torch import save_file

    parts = build_tiny_components(TinyConfig())
    file = tmp_path / "independent.safetensors"
    save_file({k: v.contiguous() for k, v in _independent_sd1_ldm(parts).items()}, str(file))
    models = load_sd_models(_args(file, tokenizer_cache_dir=str(tiny_sd1_dir)))
    assert_same_weights(models.unet, parts["unet"])
    assert_same_weights(models.vae, parts["vae"])
    assert_same_weights(models.text_encoders[0], parts["text_encoder"])
    assert models.unet.config.attention_head_dim == 8 and models.text_encoders[0].config.num_attention_heads == 4
    assert models.unet.config.use_linear_projection is False
    data = file.read_bytes()
    assert models.source == str(file) and len(data) > 0x110000
    assert models.model_hashes == {"sha256": hashlib.sha256(data).hexdigest(),
                                   "legacy": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}
    # outputs agree too (same heads, same groups), not only the weights
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(models.unet(x, t, ctx).sample, parts["unet"](x, t, ctx).sample)


@pytest.fixture(scope="module")
def sd1_ldm(tmp_path_factory, tiny_sd1_dir):
    from library.models.saving import ldm_state_dict

    models = load_sd_models(_args(tiny_sd1_dir))
    return models, ldm_state_dict(models)


def _write(tmp_path, tensors, name="m.safetensors"):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_missing_and_unexpected_weights_are_errors(sd1_ldm, tmp_path, tiny_sd1_dir):
    _, tensors = sd1_ldm
    args = {"tokenizer_cache_dir": str(tiny_sd1_dir)}
    missing = dict(tensors)
    del missing["model.diffusion_model.out.2.weight"]
    with pytest.raises(UserError, match="missing weight.*conv_out.weight"):
        load_sd_models(_args(_write(tmp_path, missing, "a.safetensors"), **args))
    extra = dict(tensors)
    extra["cond_stage_model.transformer.text_model.encoder.layers.0.extra.weight"] = torch.zeros(2)
    with pytest.raises(UserError, match="unexpected weights, e.g. encoder.layers.0.extra.weight"):
        load_sd_models(_args(_write(tmp_path, extra, "b.safetensors"), **args))
    stray = dict(tensors)
    stray["model.diffusion_model.stray_block.weight"] = torch.zeros(2)
    with pytest.raises(UserError, match="stray_block"):
        load_sd_models(_args(_write(tmp_path, stray, "c.safetensors"), **args))
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}
    with pytest.raises(UserError, match="not a Stable Diffusion 1.x/2.x checkpoint"):
        load_sd_models(_args(_write(tmp_path, lora, "lora.safetensors"), **args))


def test_single_file_family_mismatch(sd1_ldm, tmp_path, tiny_sd1_dir):
    _, tensors = sd1_ldm
    with pytest.raises(UserError, match="Remove --v2"):
        load_sd_models(_args(_write(tmp_path, tensors), v2=True, tokenizer_cache_dir=str(tiny_sd1_dir)))


def test_ckpt_is_read_without_running_code(sd1_ldm, tmp_path, tiny_sd1_dir):
    models, tensors = sd1_ldm
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": tensors, "global_step": 3}, plain)
    loaded = load_sd_models(_args(plain, tokenizer_cache_dir=str(tiny_sd1_dir)))
    assert_same_weights(loaded.unet, models.unet)

    marker = tmp_path / "pwned.txt"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {**tensors, "payload": Payload()}}, evil)
    with pytest.raises(UserError, match="refused to load this pickle"):
        load_sd_models(_args(evil, tokenizer_cache_dir=str(tiny_sd1_dir)))
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.read_text() == "pwned"


def test_text_encoder_weights_with_and_without_prefix(tmp_path, tiny_sd1_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_sd1_dir, folder)
    weights = folder / "text_encoder" / "model.safetensors"
    bare = load_file(str(weights))
    assert not any(k.startswith("text_model.") for k in bare)
    reference = load_sd_models(_args(folder))
    save_file({"text_model." + k: v for k, v in bare.items()}, str(weights))
    prefixed = load_sd_models(_args(folder))
    assert_same_weights(prefixed.text_encoders[0], reference.text_encoders[0])
    save_file({k: v for k, v in bare.items() if "layers.1." not in k}, str(weights))
    with pytest.raises(UserError, match="missing weights"):
        load_sd_models(_args(folder))


def test_vae_override_from_folder_and_files(tmp_path, tiny_sd1_dir, sd1_ldm):
    from library.models.ldm_conversion import vae_diffusers_to_ldm

    other = build_tiny_components(TinyConfig(), seed=1)["vae"]
    other.save_pretrained(tmp_path / "vae_folder")
    ldm_vae = _write(tmp_path, vae_diffusers_to_ldm(other.state_dict()), "vae.safetensors")
    _, tensors = sd1_ldm
    full = {k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")}
    full.update({"first_stage_model." + k: v for k, v in vae_diffusers_to_ldm(other.state_dict()).items()})
    full_ckpt = tmp_path / "full.ckpt"
    torch.save({"state_dict": full}, full_ckpt)
    diffusers_file = _write(tmp_path, other.state_dict(), "vae_diffusers.safetensors")
    for vae in (tmp_path / "vae_folder", ldm_vae, full_ckpt, diffusers_file):
        models = load_sd_models(_args(tiny_sd1_dir, vae=str(vae)))
        assert_same_weights(models.vae, other)
        assert models.vae_source == str(vae) and models.model_hashes == {}
    assert models.vae_hashes["sha256"] == hashlib.sha256(diffusers_file.read_bytes()).hexdigest()
    assert models.vae_hashes["legacy"] == hashlib.sha256(diffusers_file.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    with pytest.raises(UserError, match="--vae .*not found"):
        load_sd_models(_args(tiny_sd1_dir, vae=str(tmp_path / "nope.safetensors")))


# ------------------------------------------------------------------------------------------ tokenizers


def test_tokenizer_lookup_order_and_bundled_fallback(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from library.models.family import sd_family
    from library.models.tiny import write_clip_tokenizer
    from library.models.tokenizers import load_tokenizer

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    sd1, sd2 = sd_family(), sd_family(v2=True)
    model, cache = tmp_path / "model", tmp_path / "cache"
    # nothing anywhere: the bundled CLIP vocabulary (SD2 pads with "!", id 0)
    bundled = load_tokenizer(sd1, model_dir=model, cache_dir=cache)
    assert bundled("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert bundled.pad_token_id == 49407 and load_tokenizer(sd2).pad_token_id == 0
    assert not cache.exists()  # the bundled vocabulary is not copied anywhere

    # the Hugging Face cache (last resort) is used offline, and copied into --tokenizer_cache_dir
    snapshot = tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc"
    write_clip_tokenizer(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    assert load_tokenizer(sd1).name_or_path == "openai/clip-vit-large-patch14"
    load_tokenizer(sd1, cache_dir=cache)
    assert (cache / "openai_clip-vit-large-patch14" / "tokenizer.json").is_file()

    write_clip_tokenizer(cache / "tokenizer")
    write_clip_tokenizer(model / "tokenizer")
    assert load_tokenizer(sd1, model_dir=model, cache_dir=cache).name_or_path == str(model / "tokenizer")
    assert load_tokenizer(sd1, cache_dir=cache).name_or_path == str(cache / "openai_clip-vit-large-patch14")
    # an SD1 tokenizer given for SD2 still pads with "!" (id 0)
    assert load_tokenizer(sd2, cache_dir=cache / "tokenizer").pad_token_id == 0
    assert load_tokenizer(sd1, cache_dir=cache / "tokenizer")("a photo of a cat").input_ids[-1] == 49407


def test_hub_id_found_in_the_local_cache(tmp_path, monkeypatch, tiny_sd1_dir):
    import shutil

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(tiny_sd1_dir, repo / "snapshots" / "rev1")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("rev1")
    models = load_sd_models(_args("someone/tiny-sd"))
    assert models.source == str(repo / "snapshots" / "rev1")
    assert_same_weights(models.unet, build_tiny_components(TinyConfig())["unet"])
    (repo / "snapshots" / "rev1" / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        load_sd_models(_args("someone/tiny-sd"))


def test_old_text_encoder_layout_and_extra_top_level_keys(sd1_ldm, tmp_path, tiny_sd1_dir):
    models, tensors = sd1_ldm
    new_prefix, old_prefix = "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."
    old = {k.replace(new_prefix, old_prefix): v for k, v in tensors.items()}
    old["model_ema.decay"] = torch.tensor(0.999)
    old["model_ema.diffusion_modelout2weight"] = torch.zeros(1)
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in old.items()}
    loaded = load_sd_models(_args(_write(tmp_path, half), tokenizer_cache_dir=str(tiny_sd1_dir)))
    assert loaded.unet.dtype == torch.float32
    te = models.text_encoders[0].state_dict()
    for k, v in loaded.text_encoders[0].state_dict().items():
        assert torch.equal(v, te[k].half().float()), k


def test_sd2_file_without_the_unused_openclip_block(tmp_path, tiny_sd2_dir):
    """Converters that drop the unused last block also drop text_projection; then every block is kept."""
    from library.models.saving import ldm_state_dict

    models = load_sd_models(_args(tiny_sd2_dir, v2=True))
    tensors = ldm_state_dict(models)
    tokenizers = str(tiny_sd2_dir)
    full_file = _write(tmp_path, tensors, "full.safetensors")
    unused = tuple(f"cond_stage_model.model.{k}" for k in ("transformer.resblocks.2.", "text_projection", "logit_"))
    short_file = _write(tmp_path, {k: v for k, v in tensors.items() if not k.startswith(unused)}, "short.safetensors")
    full = load_sd_models(_args(full_file, v2=True, tokenizer_cache_dir=tokenizers))
    short = load_sd_models(_args(short_file, v2=True, tokenizer_cache_dir=tokenizers))
    for loaded in (full, short):
        assert loaded.text_encoders[0].config.num_hidden_layers == 2
        assert_same_weights(loaded.text_encoders[0], models.text_encoders[0])


def test_vae_folder_with_old_diffusers_attention_names(tmp_path, tiny_sd1_dir):
    """Old diffusers VAE folders (e.g. sd-vae-ft-mse) name the attention query/key/value/proj_attn, some as 1x1
    convs; they load with the same values."""
    from safetensors.torch import save_file

    other = build_tiny_components(TinyConfig(), seed=2)["vae"]
    folder = tmp_path / "old_vae"
    other.save_pretrained(folder)
    renamed = {}
    for key, value in other.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value[:, :, None, None] if key.endswith("weight") and "encoder" in key else value
        renamed[key] = value.contiguous()
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in renamed
    assert renamed["encoder.mid_block.attentions.0.query.weight"].ndim == 4
    save_file(renamed, str(folder / "diffusion_pytorch_model.safetensors"))
    models = load_sd_models(_args(tiny_sd1_dir, vae=str(folder)))
    assert_same_weights(models.vae, other)


def test_ckpt_family_mismatch_is_reported_before_the_tokenizer(tmp_path, monkeypatch, tiny_sd2_dir):
    """A .ckpt has no cheap header, but a missing --v2 must still be the first message, not 'no SD1 tokenizer'."""
    import huggingface_hub.constants

    from library.models.saving import ldm_state_dict

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    models = load_sd_models(_args(tiny_sd2_dir, v2=True))
    ckpt = tmp_path / "sd2.ckpt"
    torch.save({"state_dict": ldm_state_dict(models)}, ckpt)
    with pytest.raises(UserError, match="sd2.ckpt: this is a Stable Diffusion 2.x model.*Add --v2"):
        load_sd_models(_args(ckpt))
    # no tokenizer anywhere: the bundled CLIP vocabulary, padding with "!" (id 0) as SD2's
    assert load_sd_models(_args(ckpt, v2=True)).tokenizers[0].pad_token_id == 0
    loaded = load_sd_models(_args(ckpt, v2=True, tokenizer_cache_dir=str(tiny_sd2_dir)))
    assert_same_weights(loaded.unet, models.unet)
    assert_same_weights(loaded.text_encoders[0], models.text_encoders[0])
