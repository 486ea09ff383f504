"""The LDM key conversion against diffusers' own converter, at tiny and at real SD1.5 / SD2.1 sizes.

Real-size models are built on the meta device (shapes only, no memory, no download): the conversion and
the architecture inference only look at names and shapes.
"""

from __future__ import annotations

import pytest
import torch

from library.models import ldm_conversion as conv
from library.models.architecture import infer_text_config, infer_unet_config, infer_vae_config
from library.models.family import sd_family
from library.models.loading import SDModels
from library.models.saving import ldm_state_dict
from library.models.tiny import TinyConfig, build_tiny_components


def _real_components(sd2: bool):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    width = 1024 if sd2 else 768
    with init_empty_weights():
        unet = UNet2DConditionModel(
            sample_size=96 if sd2 else 64,
            cross_attention_dim=width,
            attention_head_dim=[5, 10, 20, 20] if sd2 else 8,
            use_linear_projection=sd2,
            upcast_attention=sd2,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=768 if sd2 else 512,
        )
        te = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=width,
                intermediate_size=4 * width,
                num_hidden_layers=23 if sd2 else 12,
                num_attention_heads=16 if sd2 else 12,
                hidden_act="gelu" if sd2 else "quick_gelu",
                projection_dim=width,
            )
        )
    return {"unet": unet, "vae": vae, "text_encoder": te}


def _part(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _components(kind: str, sd2: bool):
    return _real_components(sd2) if kind == "real" else build_tiny_components(TinyConfig(sd2=sd2))


@pytest.mark.parametrize("kind", ["tiny", "real"])
@pytest.mark.parametrize("sd2", [False, True])
def test_matches_diffusers_converter_and_infers_the_config(kind, sd2):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    parts = _components(kind, sd2)
    family = sd_family(v2=sd2, v_parameterization=sd2 and kind == "real")
    models = SDModels(family, parts["unet"], parts["vae"], [parts["text_encoder"]], [], "memory")
    ldm = ldm_state_dict(models)

    unet_sd, vae_sd = parts["unet"].state_dict(), parts["vae"].state_dict()
    theirs = convert_ldm_unet_checkpoint(ldm, dict(parts["unet"].config))
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in unet_sd.items()}
    ldm_vae = {k: v for k, v in ldm.items() if k.startswith("first_stage_model.")}
    theirs_vae = convert_ldm_vae_checkpoint(ldm_vae, dict(parts["vae"].config))
    assert {k: v.shape for k, v in theirs_vae.items()} == {k: v.shape for k, v in vae_sd.items()}
    if kind == "tiny":
        assert all(torch.equal(theirs[k], v) for k, v in unet_sd.items())
        assert all(torch.equal(theirs_vae[k], v) for k, v in vae_sd.items())

    # our own way back, and the configs read from shapes (real sizes follow the documented head rules)
    ours = conv.unet_ldm_to_diffusers(_part(ldm, conv.UNET_PREFIX))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in unet_sd.items()}
    if kind == "real":
        unet_cfg = infer_unet_config(ours, family, {})
        expected = dict(parts["unet"].config)
        for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "use_linear_projection",
                    "attention_head_dim", "sample_size", "upcast_attention", "down_block_types", "up_block_types"):
            value = unet_cfg[key]
            assert (list(value) if isinstance(value, (list, tuple)) else value) == (
                list(expected[key]) if isinstance(expected[key], (list, tuple)) else expected[key]
            ), key
        vae = conv.vae_ldm_to_diffusers(_part(ldm, conv.VAE_PREFIX))
        vae_cfg = infer_vae_config(vae, family, {})
        assert list(vae_cfg["block_out_channels"]) == [128, 256, 512, 512] and vae_cfg["layers_per_block"] == 2
        prefix = conv.OPENCLIP_PREFIX if sd2 else conv.CLIP_PREFIX
        te = _part(ldm, prefix)
        bare = conv.openclip_to_bare(te) if sd2 else conv.clip_ldm_to_bare(te)
        te_cfg = infer_text_config(bare, family, {})
        assert (te_cfg.num_hidden_layers, te_cfg.num_attention_heads) == ((23, 16) if sd2 else (12, 12))
        if sd2:  # the real SD2 file layout: 24 OpenCLIP blocks
            assert f"{conv.OPENCLIP_PREFIX}transformer.resblocks.23.attn.in_proj_weight" in ldm
            assert f"{conv.OPENCLIP_PREFIX}transformer.resblocks.24.attn.in_proj_weight" not in ldm
        else:
            assert f"{conv.CLIP_PREFIX}text_model.encoder.layers.11.mlp.fc2.weight" in ldm
        assert ldm[f"{conv.UNET_PREFIX}output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
        assert ldm[f"{conv.UNET_PREFIX}output_blocks.8.2.conv.weight"].shape == (640, 640, 3, 3)
        assert ldm[f"{conv.UNET_PREFIX}input_blocks.9.0.op.weight"].shape == (1280, 1280, 3, 3)
        assert ldm[f"{conv.VAE_PREFIX}encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_openclip_split_matches_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    parts = build_tiny_components(TinyConfig(sd2=True))
    models = SDModels(sd_family(v2=True), parts["unet"], parts["vae"], [parts["text_encoder"]], [], "memory")
    other = build_tiny_components(TinyConfig(sd2=True), seed=5)["text_encoder"]
    theirs = conv.strip_text_model_prefix(convert_open_clip_checkpoint(other, ldm_state_dict(models)))
    ours = parts["text_encoder"].state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in ours.items())
    # diffusers keeps the unused last OpenCLIP block as layer 2; we drop it (SD2 uses the penultimate layer)
    assert {k.split(".")[2] for k in set(theirs) - set(ours)} == {"2"}


@pytest.mark.parametrize("sd2", [False, True])
def test_our_single_files_read_with_diffusers_from_single_file(tmp_path, sd2, tiny_sd1_dir, tiny_sd2_dir):
    import argparse

    from diffusers import StableDiffusionPipeline

    from library.models.loading import load_sd_models
    from library.models.saving import save_sd_model
    from tests.test_models_loading import assert_same_weights

    folder = tiny_sd2_dir if sd2 else tiny_sd1_dir
    models = load_sd_models(argparse.Namespace(pretrained_model_name_or_path=str(folder), v2=sd2))
    file = save_sd_model(tmp_path / "m.safetensors", models, fmt="safetensors")
    pipe = StableDiffusionPipeline.from_single_file(str(file), config=str(folder), safety_checker=None,
                                                    requires_safety_checker=False)
    assert_same_weights(pipe.unet, models.unet)
    assert_same_weights(pipe.vae, models.vae)
    assert_same_weights(pipe.text_encoder, models.text_encoders[0])


@pytest.mark.parametrize("linear", [False, True])
def test_two_layers_per_block_values_match_diffusers_converter(linear):
    """Real SD models have 2 ResNets per level (3 per up level): indices that only exist there (input_blocks.2,
    output_blocks.2/5/8, decoder.up.*.block.2) must carry the right values, not only the right shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
                                cross_attention_dim=32, attention_head_dim=8, use_linear_projection=linear)
    vae = AutoencoderKL(block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
    unet_sd, vae_sd = unet.state_dict(), vae.state_dict()
    ldm = {conv.UNET_PREFIX + k: v for k, v in conv.unet_diffusers_to_ldm(unet_sd, unet.config).items()}
    ldm.update({conv.VAE_PREFIX + k: v for k, v in conv.vae_diffusers_to_ldm(vae_sd).items()})
    assert f"{conv.UNET_PREFIX}output_blocks.8.2.conv.weight" in ldm
    assert f"{conv.VAE_PREFIX}decoder.up.0.block.2.conv1.weight" in ldm
    theirs = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert theirs.keys() == unet_sd.keys() and all(torch.equal(theirs[k], v) for k, v in unet_sd.items())
    theirs_vae = convert_ldm_vae_checkpoint({k: v for k, v in ldm.items() if k.startswith(conv.VAE_PREFIX)},
                                            dict(vae.config))
    assert theirs_vae.keys() == vae_sd.keys()
    assert all(torch.equal(theirs_vae[k].reshape(v.shape), v) for k, v in vae_sd.items())
    ours = conv.unet_ldm_to_diffusers(_part(ldm, conv.UNET_PREFIX))
    assert all(torch.equal(ours[k], v) for k, v in unet_sd.items())
    assert infer_unet_config(ours, sd_family(), {})["layers_per_block"] == 2
