"""sd3_train_network.py end to end on tiny SD3 / SD3.5 models: the single file (with and without the text
encoders inside), diffusers folders, every weighting scheme, text caching and dropout, metadata, learning,
bit-exact resume, and bad input refused before any model loads."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.models.sd3.tiny import TinySD3Config, save_tiny_sd3_diffusers, save_tiny_sd3_files
from library.training.flow_matching import WEIGHTING_SCHEMES
from train_helpers import dataset_toml, load_lora, make_images, train_args


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    files = save_tiny_sd3_files(root / "m", TinySD3Config(variant="5-medium"))
    files["data"] = dataset_toml(root / "data.toml", make_images(root / "images", count=2), resolution=64)
    return files


def _argv(sd3, out, *, steps=2, model=None, extra=()):
    argv = train_args(model or sd3["sd3"], out, config=sd3["data"], steps=steps)
    return argv + ["--tokenizer_cache_dir", str(sd3["tokenizer_cache_dir"]), "--t5xxl_max_token_length", "8",
                   *extra]


def _main(argv):
    import sd3_train_network

    torch.set_num_threads(1)
    return sd3_train_network.main(argv)


def _prepare(argv):
    import sd3_train_network
    from library.config.arguments import SUPPORT_TRAIN_NETWORK
    from library.config.run_config import load_run_config
    from library.models.sd3.recipe import SD3LoRARecipe
    from library.training.loop import prepare_training

    torch.set_num_threads(1)
    args = load_run_config(sd3_train_network.build_parser(), argv)
    return prepare_training(args, SD3LoRARecipe(args), SUPPORT_TRAIN_NETWORK, families=("sd3",))


def test_trains_an_sd3_lora_with_sd_scripts_names_and_metadata(sd3, tmp_path):
    out = _main(_argv(sd3, tmp_path / "out", steps=3, extra=["--cache_latents"]))
    sd, meta = load_lora(out)
    names = {k.split(".")[0] for k in sd}
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv" in names and "lora_unet_joint_blocks_0_x_block_attn2_qkv" in names
    assert "lora_unet_joint_blocks_1_context_block_attn_proj" not in names  # the last context block is pre-only
    assert sum(n.startswith("lora_te1_text_model_") for n in names) == 12
    assert sum(n.startswith("lora_te2_text_model_") for n in names) == 12
    assert not any(n.startswith("lora_te3_") for n in names)
    assert sd["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (3 * 32, 4)
    assert any(sd[k].abs().sum() > 0 for k in sd if k.endswith("lora_up.weight"))
    assert meta["ss_base_model_version"] == "5-medium"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert meta["ss_network_module"] == "networks.lora_sd3"
    assert (meta["ss_weighting_scheme"], meta["ss_apply_t5_attn_mask"]) == ("uniform", "False")
