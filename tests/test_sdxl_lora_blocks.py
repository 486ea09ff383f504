"""Block-wise LoRA network args on SDXL (``block_dims``, ``block_alphas``, ``conv_block_dims``,
``down/mid/up_lr_weight``) in sd-scripts' SDXL numbering: 0 embeddings, 1-9 input blocks, 10-12 the middle
block's parts, 13-21 output blocks, 22 the output layers (23 slots; SD1/2 has 25)."""

from __future__ import annotations

import math

import pytest
import torch

from library.errors import UserError
from library.models.families.base import SDXL_LORA_BLOCKS
from networks import lora
from networks.lora_options import block_index
from tests.train_helpers import dreambooth_dir


@pytest.fixture(scope="module")
def real_size_sdxl():
    """The SDXL base 1.0 UNet and text encoders on the meta device (no weights)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.tiny_sdxl import sdxl_base_text_configs, sdxl_base_unet_config

    c1, c2 = sdxl_base_text_configs()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_base_unet_config())
        tes = [CLIPTextModel(CLIPTextConfig(**c1)), CLIPTextModelWithProjection(CLIPTextConfig(**c2))]
    return unet, tes


def test_sdxl_block_slots_follow_sd_scripts_numbering():
    slot = lambda name: block_index(name, SDXL_LORA_BLOCKS)  # noqa: E731
    assert slot("lora_unet_input_blocks_1_0_in_layers_2") == 2
    assert slot("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") == 5
    assert slot("lora_unet_input_blocks_8_1_proj_in") == 9
    assert slot("lora_unet_middle_block_0_in_layers_2") == 10
    assert slot("lora_unet_middle_block_1_proj_in") == 11
    assert slot("lora_unet_middle_block_2_out_layers_3") == 12
    assert slot("lora_unet_output_blocks_0_1_proj_out") == 13
    assert slot("lora_unet_output_blocks_8_0_skip_connection") == 21
    assert slot("lora_unet_time_embed_0") == 0 and slot("lora_unet_out_2") == 22
    assert slot("lora_te1_text_model_encoder_layers_0_mlp_fc1") == -1
    assert SDXL_LORA_BLOCKS.total == 23


def test_block_dims_alphas_and_conv_block_dims_on_the_real_size_architecture(real_size_sdxl):
    unet, tes = real_size_sdxl
    dims = [0] + [2 * i for i in range(1, 22)] + [0]  # slot 0 and 22 have no LoRA modules anyway
    dims[5] = 0  # input block 4: no LoRA
    alphas = [0.5 * i for i in range(23)]
    conv = [3] * 23
    conv[5] = conv[13] = 0
    with torch.device("meta"):
        net = lora.create_network(1.0, 4, 1, None, tes, unet, block_dims=",".join(map(str, dims)),
                                  block_alphas=",".join(map(str, alphas)), conv_block_dims=",".join(map(str, conv)),
                                  conv_block_alphas="1," * 22 + "1")
    slots = {}
    for m in net.unet_loras:
        idx = block_index(m.lora_name, SDXL_LORA_BLOCKS)
        slots.setdefault(idx, []).append(m)
        is_3x3 = m.lora_down.weight.dim() == 4 and m.lora_down.weight.shape[2:] != (1, 1)
        expected_dim = conv[idx] if is_3x3 else dims[idx]
        assert m.lora_dim == expected_dim, m.lora_name
        assert m.scale == pytest.approx((1.0 if is_3x3 else alphas[idx]) / expected_dim), m.lora_name
    assert 5 not in slots  # dims 0: the block gets no LoRA at all
    assert all(m.lora_down.weight.shape[2:] == (1, 1) or m.lora_down.weight.dim() == 2 for m in slots[13])
    assert sorted(slots) == [i for i in range(2, 22) if i != 5]  # input block 0 is conv_in: no target
    assert len(net.text_encoder_loras) == 72 + 192  # text encoders keep network_dim


def test_block_lr_weights_make_one_group_per_sdxl_block(real_size_sdxl):
    unet, tes = real_size_sdxl
    with torch.device("meta"):
        net = lora.create_network(1.0, 4, 1, None, tes, unet, conv_dim="4", down_lr_weight="1,1,1,0,0.5,1,1,1,2",
                                  mid_lr_weight="0.25,1", up_lr_weight="cosine+0.1")
    groups, names = net.prepare_optimizer_params(None, 1.0, 1.0)
    lrs = {name: g["lr"] for g, name in zip(groups, names) if name.startswith("unet")}
    assert "unet_block4" not in lrs  # weight 0: no LoRA, no group
    assert not any(block_index(m.lora_name, SDXL_LORA_BLOCKS) == 4 for m in net.unet_loras)
    assert lrs["unet_block2"] == 1.0 and lrs["unet_block5"] == 0.5 and lrs["unet_block9"] == 2.0
    assert lrs["unet_block10"] == 0.25 and lrs["unet_block11"] == 1.0 and lrs["unet_block12"] == 1.0  # padded
    cosine = [math.sin(math.pi * (i / 8) / 2) + 0.1 for i in reversed(range(9))]
    for i in range(9):
        assert lrs[f"unet_block{13 + i}"] == pytest.approx(cosine[i])
    assert sorted(lrs) == sorted(f"unet_block{i}" for i in range(2, 22) if i != 4)  # input block 0: conv_in


@pytest.fixture(scope="module")
def tiny_sdxl_file(tmp_path_factory):
    from library.models.tiny_sdxl import save_tiny_sdxl_single_file

    root = tmp_path_factory.mktemp("sdxl_blocks")
    return save_tiny_sdxl_single_file(root / "tiny.safetensors"), dreambooth_dir(root / "train", count=1)


def _argv(model, out, data, network_args):
    return ["--pretrained_model_name_or_path", str(model), "--output_dir", str(out), "--train_data_dir", str(data),
            "--resolution", "64", "--max_train_steps", "1", "--network_args", *network_args]


@pytest.mark.parametrize("script, values, message", [
    ("sdxl", 25, "25 values given, 23 needed for the SDXL UNet (the embeddings, 9 down blocks"),
    ("sd", 23, "23 values given, 25 needed for the SD1/2 UNet (12 down blocks, the mid block, 12 up blocks)"),
])
def test_a_block_count_of_the_other_family_is_one_message_before_any_model_loads(
        tiny_sdxl_file, tiny_sd1_dir, tmp_path, script, values, message):
    import sdxl_train_network
    import train_network

    main, model = (sdxl_train_network.main, tiny_sdxl_file[0]) if script == "sdxl" else (train_network.main,
                                                                                          tiny_sd1_dir)
    with pytest.raises(UserError) as err:
        main(_argv(model, tmp_path / "out", tiny_sdxl_file[1], ["block_dims=" + ",".join(["4"] * values)]))
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_sdxl_lora_with_block_dims_trains_and_saves_those_ranks(tiny_sdxl_file, tmp_path):
    from safetensors.torch import load_file

    import sdxl_train_network

    dims = ["4"] * 23
    dims[5] = "2"  # input block 4 (the first with attention in the tiny model) gets rank 2
    dims[6] = "0"  # input block 5: no LoRA
    torch.set_num_threads(1)
    path = sdxl_train_network.main(_argv(tiny_sdxl_file[0], tmp_path / "out", tiny_sdxl_file[1],
                                         ["block_dims=" + ",".join(dims)]) + ["--network_train_unet_only"])
    weights = load_file(str(path))
    downs = {k[: -len(".lora_down.weight")]: v for k, v in weights.items() if k.endswith(".lora_down.weight")}
    assert downs
    for name, down in downs.items():
        assert down.shape[0] == (2 if block_index(name, SDXL_LORA_BLOCKS) == 5 else 4), name
    slots = {block_index(n, SDXL_LORA_BLOCKS) for n in downs}
    assert 5 in slots and 6 not in slots and 11 in slots
