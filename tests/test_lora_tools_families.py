"""The LoRA utilities on SDXL and FLUX.1 (tiny models in their real on-disk formats; full-size models on ``meta``
for the loader checks), and ``--lbws`` block weights."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import networks.lora as lora
from family_helpers import assert_extracted, check_report, full_size_lora, merge_and_extract
from library.errors import UserError
from library.lora_tools.lora_file import read_lora
from library.lora_tools.targets import load_model_for_lora
from library.models.families import sdxl_family
from library.models.families.flux import flux_family
from networks import lora_flux, merge_lora, svd_merge_lora
from tests.test_lora_network import randomize_up


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from library.models.tiny_sdxl import save_tiny_sdxl_diffusers_model, save_tiny_sdxl_single_file

    root = tmp_path_factory.mktemp("lora_tools_sdxl")
    return {"folder": save_tiny_sdxl_diffusers_model(root / "model", seed=3),
            "file": save_tiny_sdxl_single_file(root / "sdxl.safetensors", seed=3)}


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from library.models.flux.tiny import TinyFluxConfig, save_tiny_flux_files

    return save_tiny_flux_files(tmp_path_factory.mktemp("lora_tools_flux"), TinyFluxConfig(), seed=5)


def load_sdxl(path):
    return load_model_for_lora(path, sdxl_family()).models


def sdxl_lora(model, path, *, seed=1, dim=4, alpha=2.0, conv_dim=None, keep=None):
    """A random SDXL LoRA (both text encoders, UNet; LoCon with ``conv_dim``); ``keep`` filters module names."""
    models = load_sdxl(model)
    kwargs = {} if conv_dim is None else {"conv_dim": str(conv_dim), "conv_alpha": "1"}
    torch.manual_seed(seed)
    network = lora.create_network(1.0, dim, alpha, None, models.text_encoders, models.unet, **kwargs)
    randomize_up(network, seed=seed)
    network.save_weights(str(path), None, {"ss_network_module": "networks.lora"})
    if keep is not None:
        save_file({k: v for k, v in load_file(str(path)).items() if keep(k.split(".")[0])}, str(path))
    return path


def sdxl_weights(models) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v for k, v in models.unet.state_dict().items()}
    for i, te in enumerate(models.text_encoders):
        out.update({f"te{i}.{k}": v for k, v in te.state_dict().items()})
    return out


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ------------------------------------------------------------------------------------------- SDXL


@pytest.mark.parametrize("out_name", ["merged.safetensors", "merged_folder"])
def test_sdxl_merge_equals_in_memory_merge(sdxl, tmp_path, out_name):
    a = sdxl_lora(sdxl["file"], tmp_path / "a.safetensors", conv_dim=2)
    b = sdxl_lora(sdxl["file"], tmp_path / "b.safetensors", seed=2, dim=2, alpha=1)
    out = tmp_path / out_name
    merge_lora.main(["--sd_model", str(sdxl["file"]), "--save_to", str(out), "--models", str(a), str(b),
                     "--ratios", "0.7", "-0.4"])
    expected = load_sdxl(sdxl["file"])
    for file, ratio in ((a, 0.7), (b, -0.4)):
        network, sd = lora.create_network_from_weights(ratio, str(file), None, expected.text_encoders, expected.unet)
        network.merge_to(expected.text_encoders, expected.unet, sd, torch.float32, "cpu")
    merged = load_sdxl(out)
    assert max_diff(sdxl_weights(merged), sdxl_weights(expected)) < 1e-6
    before = sdxl_weights(load_sdxl(sdxl["file"]))
    for prefix in ("unet.", "te0.", "te1."):  # both text encoders and the UNet changed
        assert max(float((v - before[k]).abs().max()) for k, v in sdxl_weights(merged).items()
                   if k.startswith(prefix)) > 1e-3
    if out.suffix:
        with safe_open(str(out), "pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
        assert any(k.startswith("conditioner.embedders.1.model.") for k in keys)


def test_sdxl_merge_matches_diffusers_fuse_lora(sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    a = sdxl_lora(sdxl["folder"], tmp_path / "a.safetensors", conv_dim=2)
    out = tmp_path / "merged"
    merge_lora.main(["--sd_model", str(sdxl["folder"]), "--save_to", str(out), "--models", str(a),
                     "--ratios", "0.8", "--save_precision", "float"])
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl["folder"]), local_files_only=True)
    pipe.load_lora_weights(str(a))
    pipe.fuse_lora(lora_scale=0.8)
    pipe.unload_lora_weights()
    ours = StableDiffusionXLPipeline.from_pretrained(str(out), local_files_only=True)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        theirs, mine = getattr(pipe, part).state_dict(), getattr(ours, part).state_dict()
        assert max_diff(mine, theirs) < 1e-5, part
    base = StableDiffusionXLPipeline.from_pretrained(str(sdxl["folder"]), local_files_only=True)
    assert max_diff(ours.unet.state_dict(), base.unet.state_dict()) > 1e-3


def test_sdxl_extract_takes_each_text_encoder_that_differs(sdxl, tmp_path):
    known = sdxl_lora(sdxl["file"], tmp_path / "known.safetensors", dim=2, alpha=2, conv_dim=2,
                      keep=lambda name: not name.startswith("lora_te1_"))
    extracted = merge_and_extract(sdxl["file"], known, tmp_path, "--dim", "2", "--conv_dim", "2", "--clamp_quantile",
                                  "1", "--sdxl")
    names = set(extracted.modules)
    assert any(n.startswith("lora_te2_") for n in names) and not any(n.startswith("lora_te1_") for n in names)
    assert_extracted(known, extracted)
    assert extracted.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    both = sdxl_lora(sdxl["file"], tmp_path / "both.safetensors", dim=1, alpha=1, seed=4)
    parts = {n.split("_")[1] for n in merge_and_extract(sdxl["file"], both, tmp_path, "--dim", "1", "--clamp_quantile",
                                                        "1").modules}
    assert parts == {"te1", "te2", "unet"}


def _shapes(spec_name):
    from types import SimpleNamespace

    from library.lora_tools.targets import fused_shape
    from library.models.families import family_spec

    def targets_of(text_encoders, denoiser):
        models = SimpleNamespace(text_encoders=text_encoders, denoiser=denoiser)
        return {n: fused_shape(p) for n, p in family_spec(spec_name).lora_targets(models, False).items()}
    return targets_of


def test_check_reports_sdxl_counts_and_loaders(tmp_path, capsys):
    from library.lora_tools.references import sdxl_reference

    path = tmp_path / "sdxl_full.safetensors"
    full_size_lora(_shapes("sdxl")(*sdxl_reference()), path,
                   rename=lambda n: n.replace("lora_te1_text_model_", "lora_te1_"))  # transformers-5 spelling
    check_report(capsys, [str(path)], ["family: SDXL\n", "modules: 986 (te1: 72, te2: 192, unet: 722)",
                                       "without 'text_model_'", "loads in networks.lora: yes: all 986 modules match",
                                       "loads in diffusers: yes: layers applied: unet 722/722, text encoder 264/264"])


def test_lbws_weigh_the_blocks_like_sd_scripts(sdxl, tmp_path, capsys):
    from library.lora_tools.block_weights import BLOCKS, sdxl_block

    a = sdxl_lora(sdxl["file"], tmp_path / "a.safetensors")
    weights = [0.5, 0, 0, 2, 2, 1, 0, 0, 0, 0, 0, 3]  # BASE IN04 IN05 IN07 IN08 MID OUT00..OUT05
    out = tmp_path / "weighted.safetensors"
    merge_lora.main(["--save_to", str(out), "--models", str(a), "--ratios", "0.5", "--lbws", str(weights)])
    assert "block weights of LoRA 1: BASE 0.5, IN04 0, IN05 0, IN07 2, IN08 2, OUT00 0" in capsys.readouterr().out
    per_block = dict(zip([0, 5, 6, 8, 9, 13, 14, 15, 16, 17, 18, 19], weights))
    source, result = read_lora(a), read_lora(out)
    seen = set()
    for name, m in source.modules.items():
        block = BLOCKS.index(sdxl_block(name))
        factor = 0.5 * per_block.get(block, 1.0)
        seen.add(block)
        if factor == 0:
            assert name not in result.modules
        else:
            assert torch.allclose(result.modules[name].delta(), factor * m.delta(), atol=1e-6), name
    assert {0, 5, 8, 13, 14, 19} <= seen  # the tiny UNet has modules in the weighted blocks
    svd = tmp_path / "svd.safetensors"
    svd_merge_lora.main(["--save_to", str(svd), "--models", str(a), "--new_rank", "4", "--lbws", str(weights)])
    name = "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_q"
    assert torch.allclose(read_lora(svd).modules[name].delta(), 3.0 * source.modules[name].delta(), atol=1e-5)
    for bad, message in (("[1,1]", "12 or 20 values for SDXL"), ("1,2", "JSON list of numbers")):
        with pytest.raises(UserError, match=message):
            merge_lora.main(["--save_to", str(tmp_path / "x.safetensors"), "--models", str(a), "--lbws", bad])


def test_block_index_of_sd1_names():
    from library.lora_tools.block_weights import sd_block

    cases = {"lora_te_text_model_encoder_layers_0_mlp_fc1": "BASE",
             "lora_unet_down_blocks_0_attentions_1_proj_in": "IN02",
             "lora_unet_down_blocks_1_downsamplers_0_conv": "IN06",
             "lora_unet_mid_block_attentions_0_proj_out": "MID",
             "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q": "OUT11",
             "lora_unet_up_blocks_1_upsamplers_0_conv": "OUT05"}
    assert {n: sd_block(n) for n in cases} == cases


# ------------------------------------------------------------------------------------------- FLUX


def flux_lora(path, *, seed=1, **network_args):
    """A random sd-scripts FLUX LoRA (fused qkv/linear1 with one shared down) for the tiny FLUX."""
    from library.models.flux.tiny import TinyFluxConfig, build_tiny_flux

    parts = build_tiny_flux(TinyFluxConfig(), seed=5)
    torch.manual_seed(seed)
    network = lora_flux.create_network(1.0, 4, 2.0, None, None, parts["transformer"], **network_args)
    randomize_up(network, seed=seed)
    network.save_weights(str(path), None, {"ss_network_module": "networks.lora_flux"})
    return path


def _bfl_key(name: str) -> str:
    """sd-scripts' FLUX LoRA name -> the BFL weight it changes."""
    key = name[len("lora_unet_"):]
    key = re.sub(r"^(double_blocks|single_blocks)_(\d+)_", r"\1.\2.", key)
    key = re.sub(r"(img|txt)_(attn|mlp|mod)_(qkv|proj|0|2|lin)$", r"\1_\2.\3", key)
    key = key.replace("modulation_lin", "modulation.lin")
    key = re.sub(r"^(time|vector|guidance)_in_(in|out)_layer$", r"\1_in.\2_layer", key)
    return key + ".weight"


def test_flux_merge_into_the_bfl_file_adds_the_fused_deltas(flux, tmp_path):
    a = flux_lora(tmp_path / "a.safetensors", in_dims="[2,2,2,2,2]")
    b = flux_lora(tmp_path / "b.safetensors", seed=2, train_blocks="single")
    out = tmp_path / "merged.safetensors"
    merge_lora.main(["--sd_model", str(flux["flux"]), "--save_to", str(out), "--models", str(a), str(b),
                     "--ratios", "0.6", "1.5"])
    base, merged = load_file(str(flux["flux"])), load_file(str(out))
    assert merged.keys() == base.keys()
    expected = {k: v.clone() for k, v in base.items()}
    for file, ratio in ((a, 0.6), (b, 1.5)):
        for name, m in read_lora(file).modules.items():
            expected[_bfl_key(name)] += ratio * m.delta()
    assert max_diff(merged, expected) < 1e-6
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert "double_blocks.0.img_attn.qkv.weight" in changed and "single_blocks.1.linear1.weight" in changed
    assert "img_in.weight" in changed and "guidance_in.out_layer.weight" in changed
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-dev"
    model = load_model_for_lora(out, flux_family("dev"))  # our loader reads the result
    assert model.models.denoiser.config.num_layers == 2


def test_flux_merge_matches_diffusers_fuse_lora(flux, tmp_path):
    """diffusers' FLUX converter hard-codes FLUX.1's single-block widths: the double blocks are compared."""
    from diffusers import FluxPipeline

    from library.models.flux.conversion import FluxArchitecture, diffusers_to_bfl
    from library.models.flux.tiny import TinyFluxConfig, build_tiny_flux, save_tiny_flux_diffusers

    a = flux_lora(tmp_path / "a.safetensors", train_blocks="double")
    out = tmp_path / "merged.safetensors"
    merge_lora.main(["--sd_model", str(flux["flux"]), "--save_to", str(out), "--models", str(a), "--ratios", "0.8"])
    folder = save_tiny_flux_diffusers(tmp_path / "model", seed=5)
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(a))
    pipe.fuse_lora(lora_scale=0.8)
    pipe.unload_lora_weights()
    theirs = pipe.transformer.state_dict()
    arch = FluxArchitecture.from_diffusers_config(pipe.transformer.config)
    assert max_diff(load_file(str(out)), diffusers_to_bfl(theirs, arch)) < 1e-5
    assert max_diff(theirs, build_tiny_flux(TinyFluxConfig(), seed=5)["transformer"].state_dict()) > 1e-3


def test_flux_extract_check_and_refusals(flux, tmp_path, capsys):
    from library.lora_tools.references import flux_reference

    known = flux_lora(tmp_path / "known.safetensors", in_dims="[2,0,0,0,2]")
    extracted = merge_and_extract(flux["flux"], known, tmp_path, "--dim", "4", "--clamp_quantile", "1")
    assert_extracted(known, extracted)
    assert extracted.metadata["ss_network_module"] == "networks.lora_flux"
    assert extracted.metadata["ss_base_model_version"] == "flux1"

    full = tmp_path / "flux_full.safetensors"  # full-size shapes; block 0 of each kind, img_in, CLIP and T5 layer 0
    first = re.compile(r"^lora_(unet_(double|single)_blocks_0_|unet_img_in|te1_text_model_encoder_layers_0_|"
                       r"te3_encoder_block_0_)")
    full_size_lora(_shapes("flux")(*flux_reference()), full, keep=first.match)
    check_report(capsys, [str(full)], [
        "family: FLUX.1\n", "modules: 27 (te1: 6, te3: 7, unet: 14)",
        "loads in networks.lora: yes: all 27 modules match (networks.lora_flux)",
        # diffusers 0.42 splits the fused modules (qkv: 3 layers, linear1: 4) and drops T5 and img_in LoRAs
        "loads in diffusers: partly: layers applied: unet 20/21, text encoder 6/13"])

    with pytest.raises(UserError, match="a FLUX.1 checkpoint is written as .safetensors file"):
        merge_lora.main(["--sd_model", str(flux["flux"]), "--save_to", str(tmp_path / "folder"), "--models",
                         str(known)])
    with pytest.raises(UserError, match="8 or 61 values for FLUX.1"):  # this tiny model's blocks, or FLUX.1's
        merge_lora.main(["--save_to", str(tmp_path / "x.safetensors"), "--models", str(known), "--lbws", "[1]"])
    te_lora = tmp_path / "with_clip.safetensors"
    sd = load_file(str(known))
    sd.update({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 2)})
    save_file(sd, str(te_lora))
    with pytest.raises(UserError, match="text encoder"):
        merge_lora.main(["--sd_model", str(flux["flux"]), "--save_to", str(tmp_path / "m.safetensors"), "--models",
                         str(te_lora)])
