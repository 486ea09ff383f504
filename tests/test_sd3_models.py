"""SD3 / SD3.5 models: the SAI <-> diffusers conversion (against diffusers' own single-file loader), variants
read from shapes, every on-disk layout loading the same weights, text conditioning, LoRA names equal to
sd-scripts' on the full-size architectures, and the fused-qkv LoRA math against the SAI fused weights."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import pytest
import torch

from library.errors import UserError
from library.models.families import resolve_family
from library.models.sd3.conversion import SAI_PREFIX, diffusers_to_sai, read_architecture, sai_to_diffusers
from library.models.sd3.tiny import (
    TinySD3Config, build_tiny_sd3, full_size_architecture, full_size_text_configs, save_tiny_sd3_diffusers,
    save_tiny_sd3_files,
)
from networks import lora_sd3

NAMES = Path(__file__).parent / "data" / "sd3_lora_names_sd_scripts.json.gz"
VARIANTS = ("medium", "5-medium", "5-large")


def _inputs(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 16, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, 12, arch.context_in_dim, generator=g),
                pooled_projections=torch.randn(2, arch.pooled_in_dim, generator=g),
                timestep=torch.tensor([999.0, 31.0]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_single_file_loads_like_diffusers_own_single_file_loader(variant, tmp_path):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from library.models.sd3.loading import build_transformer
    from library.models.weights import read_weights

    config = TinySD3Config(variant=variant)
    files = save_tiny_sd3_files(tmp_path, config, bundled=False)
    ref = build_tiny_sd3(config)["transformer"]
    ref.save_pretrained(tmp_path / "cfg" / "transformer")
    theirs = SD3Transformer2DModel.from_single_file(str(files["sd3"]), config=str(tmp_path / "cfg"),
                                                    subfolder="transformer", local_files_only=True)
    ours = build_transformer(read_weights(files["sd3"])[0], "tiny", torch.float32)
    inputs = _inputs(config.architecture())
    with torch.no_grad():
        a, b = ours(**inputs).sample, theirs(**inputs).sample
    assert torch.equal(a, b) and a.abs().sum() > 0
    # the conversion both ways is bit-exact and equals diffusers' converter tensor by tensor
    state = ref.state_dict()
    sai = diffusers_to_sai(state, prefix=SAI_PREFIX)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(sai))
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)
    back = sai_to_diffusers(dict(sai))
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert read_architecture({k: v.shape for k, v in sai.items()}).variant == variant


def _args(**kw):
    base = dict(pretrained_model_name_or_path=None, clip_l=None, clip_g=None, t5xxl=None, vae=None,
                mixed_precision="no", tokenizer_cache_dir=None, pos_emb_random_crop_rate=0.0,
                enable_scaled_pos_embed=False, t5xxl_max_token_length=8, apply_lg_attn_mask=False,
                apply_t5_attn_mask=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_every_layout_loads_the_same_model_and_conditioning(tmp_path):
    config = TinySD3Config(variant="medium")
    bundled = save_tiny_sd3_files(tmp_path / "b", config)
    parts = save_tiny_sd3_files(tmp_path / "p", config, bundled=False)
    folder = save_tiny_sd3_diffusers(tmp_path / "d", config)
    runs = [
        _args(pretrained_model_name_or_path=str(bundled["sd3"]),
              tokenizer_cache_dir=str(bundled["tokenizer_cache_dir"])),
        _args(pretrained_model_name_or_path=str(parts["sd3"]), tokenizer_cache_dir=str(parts["tokenizer_cache_dir"]),
              **{r: str(parts[r]) for r in ("clip_l", "clip_g", "t5xxl", "vae")}),
        _args(pretrained_model_name_or_path=str(folder)),
    ]
    outputs = []
    for args in runs:
        family = resolve_family(args, ("sd3",))
        assert (family.name, family.base_model_version) == ("sd3-medium", "medium")
        models = family.spec.load(args, family, device="cpu", dtype=torch.float32)
        assert models.vae.config.scaling_factor == 1.5305 and models.vae.config.shift_factor == 0.0609
        encoding = family.spec.text_encoding(models, args)
        with torch.no_grad():
            cond = encoding.encode(encoding.tokenize(["a photo of a cat", "dog"]))
            out = family.spec.forward(models.unet, torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)),
                                      torch.tensor([500.0, 20.0]), cond, torch.float32)
        assert cond["t5_out"].shape == (2, 8, 48) and cond["l_out"].shape == (2, 77, 16)
        outputs.append(out)
    assert torch.equal(outputs[0], outputs[1]) and torch.allclose(outputs[0], outputs[2], atol=1e-6)


def test_joint_context_pads_clip_to_the_t5_width_and_appends_t5():
    from library.models.sd3.text import joint_context

    cond = {"l_out": torch.ones(1, 77, 2), "g_out": 2 * torch.ones(1, 77, 3), "t5_out": 3 * torch.ones(1, 4, 8),
            "l_pooled": torch.ones(1, 2), "g_pooled": 2 * torch.ones(1, 3)}
    context, pooled = joint_context(cond, 8)
    assert context.shape == (1, 81, 8) and pooled.tolist() == [[1, 1, 2, 2, 2]]
    assert context[0, 0].tolist() == [1, 1, 2, 2, 2, 0, 0, 0] and context[0, 77].tolist() == [3] * 8


def test_text_dropout_zeroes_each_encoder_with_its_rate():
    from library.models.sd3.text import TextDropout

    cond = {k: torch.ones(400, 3) for k in ("l_out", "g_out", "l_pooled", "g_pooled", "t5_out")}
    torch.manual_seed(0)
    out = TextDropout((1.0, 0.0, 0.5))(cond)
    assert out["l_out"].abs().sum() == 0 and out["l_pooled"].abs().sum() == 0
    assert torch.equal(out["g_out"], cond["g_out"])
    dropped = (out["t5_out"].sum(1) == 0).float().mean().item()
    assert 0.4 < dropped < 0.6


def test_lora_names_and_shapes_are_sd_scripts_on_the_full_size_architectures():
    """501 (SD3 Medium), 527 (SD3.5 Medium), 641 (SD3.5 Large); +8 with emb_dims; names and shapes equal to
    those sd-scripts' networks.lora_sd3 creates on its own MMDiT (HEAD 48d368fa, listed on meta)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    expected = json.loads(gzip.open(NAMES, "rt").read())
    l_config, g_config = full_size_text_configs()
    counts = {}
    with torch.device("meta"):
        tes = [CLIPTextModelWithProjection(l_config), CLIPTextModelWithProjection(g_config)]
        for variant in VARIANTS:
            mmdit = SD3Transformer2DModel(**full_size_architecture(variant).diffusers_config())
            for suffix, kwargs in (("", {}), ("+emb", {"emb_dims": "[4,4,4,4,4,4]"})):
                net = lora_sd3.create_network(1.0, 4, 1.0, None, tes, mmdit, **kwargs)
                ours = {m.lora_name: [list(m.lora_down.weight.shape), list(m.lora_up.weight.shape)]
                        for m in net.all_loras()}
                assert ours == expected[variant + suffix]
                counts[variant + suffix] = len(ours)
    assert counts == {"medium": 501, "medium+emb": 509, "5-medium": 527, "5-medium+emb": 535, "5-large": 641,
                      "5-large+emb": 649}


@pytest.mark.parametrize("variant", ("medium", "5-medium"))
def test_fused_lora_merge_equals_the_update_of_the_sai_fused_weights(variant):
    """Merging into diffusers' split layers == adding alpha/r * up @ down to the SAI fused layers (the last
    block's context modulation and the final modulation with their swapped halves included)."""
    config = TinySD3Config(variant=variant)
    arch = config.architecture()
    transformer = build_tiny_sd3(config)["transformer"]
    net = lora_sd3.create_network(1.0, 4, 2.0, None, None, transformer, emb_dims="[4,4,4,4,4,4]")
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    sai = diffusers_to_sai(transformer.state_dict(), arch)
    weights = net.state_dict()
    for name in {k.split(".")[0] for k in weights}:
        key = name.removeprefix("lora_unet_")
        target = next(k for k in sai if k.replace(".", "_") == key + "_weight")
        up, down = weights[f"{name}.lora_up.weight"], weights[f"{name}.lora_down.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).view(sai[target].shape) if down.dim() == 4 else up @ down
        sai[target] = sai[target] + delta * 0.5
    net.merge_to(None, transformer, weights, torch.float32, "cpu")
    expected = sai_to_diffusers(sai, arch)
    merged = transformer.state_dict()
    assert max((merged[k] - expected[k]).abs().max().item() for k in expected) < 1e-6


def test_lora_forward_equals_its_merge():
    config = TinySD3Config(variant="5-medium")
    transformer = build_tiny_sd3(config)["transformer"]
    inputs = _inputs(config.architecture())
    net = lora_sd3.create_network(1.0, 4, 4.0, None, None, transformer, emb_dims="[2,2,2,2,2,2]")
    net.apply_to(None, transformer, False, True)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
        applied = transformer(**inputs).sample
    fresh = build_tiny_sd3(config)["transformer"]
    merged_net, weights = lora_sd3.create_network_from_weights(1.0, None, None, None, fresh,
                                                                weights_sd=net.state_dict())
    merged_net.merge_to(None, fresh, weights, torch.float32, "cpu")
    with torch.no_grad():
        assert torch.allclose(fresh(**inputs).sample, applied, atol=1e-5)
        assert not torch.allclose(build_tiny_sd3(config)["transformer"](**inputs).sample, applied, atol=1e-3)


def test_wrong_files_are_named_before_anything_loads(tmp_path):
    from library.models.flux.tiny import save_tiny_flux_files

    parts = save_tiny_sd3_files(tmp_path / "p", TinySD3Config(variant="5-large"), bundled=False)
    flux = save_tiny_flux_files(tmp_path / "f")
    with pytest.raises(UserError) as err:
        resolve_family(_args(pretrained_model_name_or_path=str(parts["sd3"]), clip_l=str(parts["t5xxl"]),
                             clip_g=str(parts["clip_g"]), pos_emb_random_crop_rate=0.1), ("sd3",))
    text = str(err.value)
    assert "--clip_l" in text and "is a T5 text encoder" in text and "--t5xxl is missing" in text
    assert "--vae is missing" in text and "SD3.5 Medium option" in text and "SD3.5 Large" in text
    with pytest.raises(UserError, match="FLUX family.*flux_train_network.py"):
        resolve_family(_args(pretrained_model_name_or_path=str(flux["flux"])), ("sd3",))
    with pytest.raises(UserError, match="SD3 family.*sd3_train_network.py"):
        resolve_family(_args(pretrained_model_name_or_path=str(parts["sd3"])), ("flux",))


def test_diffusers_format_is_applied_by_diffusers_with_the_same_math_as_our_merge(tmp_path):
    """StableDiffusion3Pipeline.load_lora_weights + fuse_lora on the diffusers-format file gives exactly the
    weights of our merge of the sd-scripts-format file (fused qkv, swapped modulations, patch conv, CLIPs)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from safetensors.torch import save_file

    config = TinySD3Config(variant="5-medium")
    parts = build_tiny_sd3(config)
    net = lora_sd3.create_network(1.0, 4, 2.0, None, [parts["clip_l"], parts["clip_g"]], parts["transformer"],
                                  emb_dims="[2,2,2,2,2,2]", x_mlp_dim=8)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    save_file(net.diffusers_state_dict(), str(tmp_path / "d.safetensors"))
    base = {k: v.clone() for k, v in parts["transformer"].state_dict().items()}
    pipe = StableDiffusion3Pipeline(
        transformer=parts["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(), vae=parts["vae"],
        text_encoder=parts["clip_l"], tokenizer=None, text_encoder_2=parts["clip_g"], tokenizer_2=None,
        text_encoder_3=parts["t5"], tokenizer_3=None)
    pipe.load_lora_weights(str(tmp_path / "d.safetensors"))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    ours = build_tiny_sd3(config)
    tes = [ours["clip_l"], ours["clip_g"]]
    merged, weights = lora_sd3.create_network_from_weights(1.0, None, None, tes, ours["transformer"],
                                                           weights_sd=net.state_dict())
    merged.merge_to(tes, ours["transformer"], weights, torch.float32, "cpu")
    for theirs, mine in ((pipe.transformer, ours["transformer"]), (pipe.text_encoder, ours["clip_l"]),
                         (pipe.text_encoder_2, ours["clip_g"])):
        a, b = theirs.state_dict(), mine.state_dict()
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    fused = pipe.transformer.state_dict()
    changed = {k for k in base if not torch.equal(base[k], fused[k])}
    assert {"pos_embed.proj.weight", "norm_out.linear.weight", "transformer_blocks.1.norm1_context.linear.weight",
            "transformer_blocks.0.attn2.to_k.weight"} <= changed
    q_proj = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    untouched = build_tiny_sd3(config)["clip_l"].state_dict()[q_proj]
    assert not torch.equal(pipe.text_encoder.state_dict()[q_proj], untouched)
