"""The LoRA utilities on SD3 and Lumina checkpoints (tiny models in their single-file layouts, sd-scripts' fused
``networks.lora_sd3`` / ``networks.lora_lumina`` files), FLUX.1 text encoder files, and ``--lbws`` block weights of
the transformer families."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from family_helpers import assert_extracted, merge_and_extract
from library.errors import UserError
from library.lora_tools.lora_file import read_lora
from networks import check_lora_weights, lora_lumina, lora_sd3, merge_lora, resize_lora
from tests.test_lora_network import randomize_up
from tests.test_lora_tools_families import flux_lora, max_diff


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from library.models.sd3.tiny import save_tiny_sd3_files

    return save_tiny_sd3_files(tmp_path_factory.mktemp("lora_tools_sd3"), seed=4)


@pytest.fixture(scope="module")
def lumina(tmp_path_factory):
    from library.models.lumina.tiny import save_tiny_lumina_files

    return save_tiny_lumina_files(tmp_path_factory.mktemp("lora_tools_lumina"), seed=6)


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    from library.models.flux.tiny import TinyFluxConfig, save_tiny_flux_files

    return save_tiny_flux_files(tmp_path_factory.mktemp("lora_tools_flux_te"), TinyFluxConfig(), seed=5)


def tiny_sd3():
    from library.models.sd3.tiny import build_tiny_sd3

    return build_tiny_sd3(seed=4)


def sd3_lora(path, *, seed=1, t5=True, **network_args):
    """A random sd-scripts SD3 LoRA (fused qkv, both CLIPs, T5 unless ``t5=False``) for the tiny SD3.5 Medium."""
    parts = tiny_sd3()
    torch.manual_seed(seed)
    args = {"train_t5xxl": "True", **network_args} if t5 else network_args
    network = lora_sd3.create_network(1.0, 4, 2.0, None, [parts["clip_l"], parts["clip_g"], parts["t5"]],
                                      parts["transformer"], **args)
    randomize_up(network, seed=seed)
    network.save_weights(str(path), None, {"ss_network_module": "networks.lora_sd3"})
    return path


def sd3_in_memory(files_ratios) -> dict[str, torch.Tensor]:
    """The tiny SD3 merged by our network (diffusers modules), written back in the SAI single-file names."""
    from library.models.sd3.conversion import SAI_PREFIX, TEXT_PREFIXES, diffusers_to_sai
    from library.models.sd3.tiny import TinySD3Config, _t5_state

    parts = tiny_sd3()
    tes = [parts["clip_l"], parts["clip_g"], parts["t5"]]
    for file, ratio in files_ratios:
        network, sd = lora_sd3.create_network_from_weights(ratio, str(file), None, tes, parts["transformer"])
        network.merge_to(tes, parts["transformer"], sd, torch.float32, "cpu")
    out = diffusers_to_sai(parts["transformer"].state_dict(), TinySD3Config().architecture(), prefix=SAI_PREFIX)
    out.update({TEXT_PREFIXES["clip_l"] + k: v for k, v in parts["clip_l"].state_dict().items()})
    out.update({TEXT_PREFIXES["clip_g"] + k: v for k, v in parts["clip_g"].state_dict().items()})
    out.update({TEXT_PREFIXES["t5xxl"] + k: v for k, v in _t5_state(parts["t5"]).items()})
    return out


# ------------------------------------------------------------------------------------------- SD3


def test_sd3_merge_into_the_single_file_equals_our_in_memory_merge(sd3, tmp_path):
    a = sd3_lora(tmp_path / "a.safetensors", emb_dims="[2,2,2,2,2,2]")
    b = sd3_lora(tmp_path / "b.safetensors", seed=2, t5=False)
    out = tmp_path / "merged.safetensors"
    merge_lora.main(["--sd_model", str(sd3["sd3"]), "--save_to", str(out), "--models", str(a), str(b),
                     "--ratios", "0.7", "-0.4"])
    base, merged = load_file(str(sd3["sd3"])), load_file(str(out))
    assert merged.keys() == base.keys()
    expected = sd3_in_memory([(a, 0.7), (b, -0.4)])
    assert max_diff({k: merged[k] for k in expected}, expected) < 1e-6
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    for key in ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
                "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight",
                "model.diffusion_model.joint_blocks.1.context_block.adaLN_modulation.1.weight",  # (shift, scale) rows
                "model.diffusion_model.final_layer.adaLN_modulation.1.weight",
                "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"):
        assert key in changed, key
    assert not any(k.startswith("first_stage_model.") for k in changed)  # the VAE is written back unchanged
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-3-5-medium"


def test_sd3_merge_matches_diffusers_fuse_lora(sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from library.models.sd3.conversion import SAI_PREFIX, sai_to_diffusers
    from library.models.sd3.tiny import save_tiny_sd3_diffusers

    a = sd3_lora(tmp_path / "a.safetensors", t5=False)
    out = tmp_path / "merged.safetensors"
    merge_lora.main(["--sd_model", str(sd3["sd3"]), "--save_to", str(out), "--models", str(a), "--ratios", "0.8"])
    parts = tiny_sd3()
    network, sd = lora_sd3.create_network_from_weights(1.0, str(a), None, [parts["clip_l"], parts["clip_g"], None],
                                                       parts["transformer"])
    network.load_state_dict(sd)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(save_tiny_sd3_diffusers(tmp_path / "model", seed=4)))
    pipe.load_lora_weights(network.diffusers_state_dict())
    pipe.fuse_lora(lora_scale=0.8)
    pipe.unload_lora_weights()
    merged = load_file(str(out))
    ours = sai_to_diffusers({k[len(SAI_PREFIX):]: v for k, v in merged.items() if k.startswith(SAI_PREFIX)})
    assert max_diff({k: ours[k] for k in pipe.transformer.state_dict()}, pipe.transformer.state_dict()) < 1e-5
    prefix = "text_encoders.clip_l.transformer."
    clip = {k[len(prefix):]: v for k, v in merged.items() if k.startswith(prefix)}
    assert max_diff(clip, pipe.text_encoder.state_dict()) < 1e-5


def test_sd3_concat_resize_extract_and_check(sd3, tmp_path, capsys):
    a = sd3_lora(tmp_path / "a.safetensors")
    b = sd3_lora(tmp_path / "b.safetensors", seed=2)
    both = tmp_path / "both.safetensors"
    merge_lora.main(["--save_to", str(both), "--models", str(a), str(b), "--ratios", "1", "0.5"])
    la, lb, lab = read_lora(a), read_lora(b), read_lora(both)
    assert lab.metadata["ss_network_module"] == "networks.lora_sd3"
    assert lab.metadata["ss_base_model_version"] == "5-medium"
    for name, m in lab.modules.items():
        assert m.rank == 8
        assert torch.allclose(m.delta(), la.modules[name].delta() + 0.5 * lb.modules[name].delta(), atol=1e-6), name

    resized = tmp_path / "r8.safetensors"
    resize_lora.main(["--model", str(a), "--save_to", str(resized), "--new_rank", "8"])
    for name, m in read_lora(resized).modules.items():
        assert torch.allclose(m.delta(), la.modules[name].delta(), atol=1e-6), name

    known = sd3_lora(tmp_path / "known.safetensors", seed=3, t5=False, emb_dims="[2,0,0,0,0,2]")
    known_sd = {k: v for k, v in load_file(str(known)).items() if not k.startswith("lora_te2_")}
    save_file(known_sd, str(known))  # CLIP-G and T5 unchanged: extracted without them
    extracted = merge_and_extract(sd3["sd3"], known, tmp_path, "--dim", "4", "--clamp_quantile", "1")
    assert {n.split("_")[1] for n in extracted.modules} == {"te1", "unet"}
    assert_extracted(known, extracted)
    assert extracted.metadata["ss_network_module"] == "networks.lora_sd3"

    capsys.readouterr()
    check_lora_weights.main([str(a), "--no_loaders"])
    report = capsys.readouterr().out
    counts = {p: sum(n.startswith(f"lora_{p}_") for n in la.modules) for p in ("te1", "te2", "te3", "unet")}
    assert "family: SD3/3.5\n" in report
    assert f"modules: {len(la.modules)} (te1: {counts['te1']}, te2: {counts['te2']}, te3: {counts['te3']}, " \
           f"unet: {counts['unet']})" in report


def _full_size(network_module, text_encoders, denoiser, path, keep, **network_args) -> int:
    """A rank-1 LoRA of our network on a full-size (meta) model, the modules ``keep`` keeps; returns their count."""
    network = network_module.create_network(1.0, 1, 1.0, None, text_encoders, denoiser, **network_args)
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=gen) * 0.01).half() if k.endswith("weight") else v.half()
             for k, v in network.state_dict().items() if keep(k.split(".")[0])}
    save_file(state, str(path))
    return len({k.split(".")[0] for k in state})


def test_check_reports_full_size_sd3_and_lumina_files(tmp_path, capsys):
    from library.lora_tools.references import lumina_reference, sd3_reference

    first = lambda n: any(f"_{b}_0_" in n for b in ("blocks", "layers", "block"))  # noqa: E731 - block 0 of each part
    sd3_file = tmp_path / "sd3_full.safetensors"
    n = _full_size(lora_sd3, *sd3_reference(), sd3_file, first, train_t5xxl="True")
    check_lora_weights.main([str(sd3_file)])
    report = capsys.readouterr().out
    assert "family: SD3/3.5\n" in report
    assert n == 29 and "modules: 29 (te1: 6, te2: 6, te3: 7, unet: 10)" in report
    assert "alphas: 1: 29" in report
    assert "loads in networks.lora: yes: all 29 modules match (networks.lora_sd3)" in report
    # diffusers reads no kohya-named SD3 LoRA (our lora_sd3 saves its own layout for it: --save_lora_format)
    assert "loads in diffusers: no: layers applied: unet 0/14, text encoder 0/19" in report

    lumina_file = tmp_path / "lumina_full.safetensors"
    n = _full_size(lora_lumina, *lumina_reference(), lumina_file, first)
    check_lora_weights.main([str(lumina_file)])
    report = capsys.readouterr().out
    assert "family: Lumina-2\n" in report
    assert n == 13 and "modules: 13 (te: 7, unet: 6)" in report
    assert "loads in networks.lora: yes: all 13 modules match (networks.lora_lumina)" in report
    assert "note: text encoder names without" not in report
    assert "loads in diffusers: no: layers applied: unet 0/8, text encoder 0/7" in report  # qkv: 3 layers


def test_sd3_lbws_weigh_the_joint_blocks(sd3, tmp_path, capsys):
    a = sd3_lora(tmp_path / "a.safetensors", emb_dims="[2,2,2,2,2,2]")
    # CLIP_L CLIP_G T5 IN J00 J01 OUT for the tiny 2-block model
    weights = [0.5, 1, 0, 2, 0, 3, 1]
    out = tmp_path / "weighted.safetensors"
    merge_lora.main(["--save_to", str(out), "--models", str(a), "--lbws", str(weights)])
    assert "block weights of LoRA 1: CLIP_L 0.5, T5 0, IN 2, J00 0, J01 3" in capsys.readouterr().out
    factor = {"lora_te1_": 0.5, "lora_te3_": 0.0, "lora_unet_joint_blocks_0_": 0.0, "lora_unet_joint_blocks_1_": 3.0,
              **{f"lora_unet_{e}_embedder": 2.0 for e in ("x", "t", "y", "context")}, "lora_unet_final_layer": 1.0}
    source, result = read_lora(a), read_lora(out)
    for name, m in source.modules.items():
        f = next((v for k, v in factor.items() if name.startswith(k)), 1.0)
        if f == 0:
            assert name not in result.modules, name
        else:
            assert torch.allclose(result.modules[name].delta(), f * m.delta(), atol=1e-6), name
    with pytest.raises(UserError, match="7 or 29 or 43 values for SD3/3.5"):
        merge_lora.main(["--save_to", str(tmp_path / "x.safetensors"), "--models", str(a), "--lbws", "[1,1]"])


# ------------------------------------------------------------------------------------------- Lumina


def lumina_lora(path, *, seed=1, **network_args):
    from library.models.lumina.tiny import build_tiny_lumina

    transformer = build_tiny_lumina(seed=6)["transformer"]
    torch.manual_seed(seed)
    network = lora_lumina.create_network(1.0, 4, 2.0, None, None, transformer, **network_args)
    randomize_up(network, seed=seed)
    network.save_weights(str(path), None, {"ss_network_module": "networks.lora_lumina"})
    return path


def test_lumina_merge_extract_concat_and_lbws(lumina, tmp_path, capsys):
    from library.models.lumina.conversion import diffusers_to_nextdit
    from library.models.lumina.tiny import build_tiny_lumina

    a = lumina_lora(tmp_path / "a.safetensors", embedder_dims="[2,2,2]")
    b = lumina_lora(tmp_path / "b.safetensors", seed=2)
    out = tmp_path / "merged.safetensors"
    merge_lora.main(["--sd_model", str(lumina["lumina"]), "--save_to", str(out), "--models", str(a), str(b),
                     "--ratios", "0.6", "1.5"])
    transformer = build_tiny_lumina(seed=6)["transformer"]
    for file, ratio in ((a, 0.6), (b, 1.5)):
        network, sd = lora_lumina.create_network_from_weights(ratio, str(file), None, None, transformer)
        network.merge_to(None, transformer, sd, torch.float32, "cpu")
    merged = load_file(str(out))
    assert max_diff(merged, diffusers_to_nextdit(transformer.state_dict())) < 1e-6
    assert not torch.equal(merged["layers.0.attention.qkv.weight"], load_file(str(lumina["lumina"]))[
        "layers.0.attention.qkv.weight"])

    both = tmp_path / "both.safetensors"
    merge_lora.main(["--save_to", str(both), "--models", str(a), str(b), "--ratios", "0.6", "1.5"])
    la, lb = read_lora(a), read_lora(b)
    for name, m in read_lora(both).modules.items():
        expected = 0.6 * la.modules[name].delta() + (1.5 * lb.modules[name].delta() if name in lb.modules else 0)
        assert torch.allclose(m.delta(), expected, atol=1e-6), name

    result = merge_and_extract(lumina["lumina"], a, tmp_path, "--dim", "4", "--clamp_quantile", "1")
    assert set(result.modules) == set(la.modules)
    assert_extracted(a, result)
    assert result.metadata["ss_network_module"] == "networks.lora_lumina"

    weights = [1, 0, 2, 1, 0, 3, 1]  # TE IN N00 C00 L00 L01 OUT of the tiny model (one refiner layer each)
    weighted = tmp_path / "weighted.safetensors"
    capsys.readouterr()
    merge_lora.main(["--save_to", str(weighted), "--models", str(a), "--lbws", str(weights)])
    assert "block weights of LoRA 1: IN 0, N00 2, L00 0, L01 3" in capsys.readouterr().out
    factor = {"lora_unet_noise_refiner_0_": 2.0, "lora_unet_layers_0_": 0.0, "lora_unet_layers_1_": 3.0,
              "lora_unet_x_embedder": 0.0, "lora_unet_t_embedder": 0.0, "lora_unet_cap_embedder": 0.0}
    result = read_lora(weighted)
    for name, m in la.modules.items():
        f = next((v for k, v in factor.items() if name.startswith(k)), 1.0)
        assert (name not in result.modules) if f == 0 else torch.allclose(result.modules[name].delta(),
                                                                          f * m.delta(), atol=1e-6), name


def test_sd3_and_lumina_refusals(sd3, lumina, tmp_path):
    a = sd3_lora(tmp_path / "a.safetensors", t5=False)
    for model, save_to, message in ((sd3["sd3"], tmp_path / "folder", "written as .safetensors file"),
                                    (lumina["lumina"], tmp_path / "x.safetensors", "is a SD3/3.5 LoRA")):
        with pytest.raises(UserError, match=message):
            merge_lora.main(["--sd_model", str(model), "--save_to", str(save_to), "--models", str(a)])
    gemma = lumina_lora(tmp_path / "with_gemma.safetensors")
    sd = load_file(str(gemma))
    sd.update({"lora_te_layers_0_mlp_up_proj.lora_down.weight": torch.zeros(2, 32),
               "lora_te_layers_0_mlp_up_proj.lora_up.weight": torch.zeros(64, 2)})
    save_file(sd, str(gemma))
    with pytest.raises(UserError, match="holds no text encoder"):
        merge_lora.main(["--sd_model", str(lumina["lumina"]), "--save_to", str(tmp_path / "m.safetensors"),
                         "--models", str(gemma)])
    with pytest.raises(UserError, match="--clip_l: .* take no separate text encoder file"):
        merge_lora.main(["--sd_model", str(sd3["sd3"]), "--save_to", str(tmp_path / "m.safetensors"), "--models",
                         str(a), "--clip_l", str(sd3["clip_l"]), "--clip_l_save_to", str(tmp_path / "c.safetensors")])


# ------------------------------------------------------------------------------------------- FLUX.1


def test_flux_text_encoder_modules_merge_into_their_files(flux_files, tmp_path):
    from library.models.flux.tiny import TinyFluxConfig, build_tiny_flux
    from networks import lora_flux

    parts = build_tiny_flux(TinyFluxConfig(), seed=5)
    torch.manual_seed(1)
    network = lora_flux.create_network(1.0, 4, 2.0, None, [parts["clip_l"], parts["t5"]], parts["transformer"],
                                       train_t5xxl="True")
    randomize_up(network)
    a = tmp_path / "a.safetensors"
    network.save_weights(str(a), None, {"ss_network_module": "networks.lora_flux"})
    names = set(read_lora(a).modules)
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te3_") for n in names)
    outs = {k: tmp_path / f"{k}_merged.safetensors" for k in ("flux", "clip_l", "t5xxl")}
    with pytest.raises(UserError, match="--clip_l and --clip_l_save_to go together"):
        merge_lora.main(["--flux_model", str(flux_files["flux"]), "--save_to", str(outs["flux"]), "--models", str(a),
                         "--clip_l", str(flux_files["clip_l"])])
    merge_lora.main(["--flux_model", str(flux_files["flux"]), "--save_to", str(outs["flux"]), "--models", str(a),
                     "--ratios", "0.7", "--clip_l", str(flux_files["clip_l"]), "--clip_l_save_to",
                     str(outs["clip_l"]), "--t5xxl", str(flux_files["t5xxl"]), "--t5xxl_save_to", str(outs["t5xxl"])])
    expected_net, sd = lora_flux.create_network_from_weights(0.7, str(a), None, [parts["clip_l"], parts["t5"]],
                                                             parts["transformer"])
    expected_net.merge_to([parts["clip_l"], parts["t5"]], parts["transformer"], sd, torch.float32, "cpu")
    clip = {"text_model." + k: v for k, v in parts["clip_l"].state_dict().items()}
    t5 = {k: v for k, v in parts["t5"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    for out, expected, source in ((outs["clip_l"], clip, flux_files["clip_l"]), (outs["t5xxl"], t5, flux_files["t5xxl"])):
        merged = load_file(str(out))
        assert merged.keys() == load_file(str(source)).keys()
        assert max_diff(merged, expected) < 1e-6
        assert max_diff(merged, load_file(str(source))) > 1e-3
    with pytest.raises(UserError, match="holds no text encoder"):
        merge_lora.main(["--sd_model", str(flux_files["flux"]), "--save_to", str(tmp_path / "m.safetensors"),
                         "--models", str(a)])


def test_flux_lbws_use_the_61_block_layout(tmp_path, capsys):
    a = flux_lora(tmp_path / "a.safetensors", in_dims="[2,2,2,2,2]")
    weights = [1, 1, 0.5, 0, 2, 3, 0, 1]  # CLIP T5 IN D00 D01 S00 S01 OUT of the tiny model
    out = tmp_path / "weighted.safetensors"
    merge_lora.main(["--save_to", str(out), "--models", str(a), "--lbws", str(weights)])
    assert "block weights of LoRA 1: IN 0.5, D00 0, D01 2, S00 3, S01 0" in capsys.readouterr().out
    factor = {"lora_unet_double_blocks_0_": 0, "lora_unet_double_blocks_1_": 2, "lora_unet_single_blocks_0_": 3,
              "lora_unet_single_blocks_1_": 0, **{f"lora_unet_{e}_in": 0.5 for e in ("img", "time", "vector", "guidance",
                                                                                         "txt")}}
    source, result = read_lora(a), read_lora(out)
    assert any(n.startswith("lora_unet_guidance_in") for n in source.modules)
    for name, m in source.modules.items():
        f = next((v for k, v in factor.items() if name.startswith(k)), 1.0)
        assert (name not in result.modules) if f == 0 else torch.allclose(result.modules[name].delta(),
                                                                          f * m.delta(), atol=1e-6), name
    full = [1.0] * 61  # FLUX.1's own 61 blocks are accepted too (this tiny file fits in them)
    merge_lora.main(["--save_to", str(tmp_path / "full.safetensors"), "--models", str(a), "--lbws", str(full)])


def test_lumina_merge_matches_diffusers_fuse_lora(lumina, tmp_path):
    """diffusers applies our Lumina LoRA in its own format (``convert_lumina_lora_to_diffusers.py``'s conversion)."""
    from diffusers import Lumina2Pipeline

    from library.models.lumina.conversion import nextdit_to_diffusers
    from library.models.lumina.diffusers_lora import to_diffusers_lora
    from library.models.lumina.tiny import save_tiny_lumina_diffusers

    a = lumina_lora(tmp_path / "a.safetensors", embedder_dims="[2,2,2]")
    out = tmp_path / "merged.safetensors"
    merge_lora.main(["--sd_model", str(lumina["lumina"]), "--save_to", str(out), "--models", str(a), "--ratios", "0.8"])
    converted, left_out = to_diffusers_lora(load_file(str(a)))
    assert not left_out
    pipe = Lumina2Pipeline.from_pretrained(str(save_tiny_lumina_diffusers(tmp_path / "model", seed=6)))
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(converted)
    pipe.fuse_lora(lora_scale=0.8)
    pipe.unload_lora_weights()
    theirs = pipe.transformer.state_dict()
    assert max_diff(nextdit_to_diffusers(load_file(str(out))), theirs) < 1e-5
    assert max_diff(theirs, before) > 1e-3
