"""networks.lora: module discovery and names, math, dropouts, LoCon, block dims, LR groups, max norm."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import networks.lora as lora
from library.errors import UserError
from library.models.tiny import TinyConfig

# The tiny SD1 UNet: Transformer2DModel blocks at these paths (diffusers names).
TRANSFORMERS = [
    "down_blocks_0_attentions_0",
    "down_blocks_1_attentions_0",
    "down_blocks_2_attentions_0",
    "mid_block_attentions_0",
] + [f"up_blocks_{i}_attentions_{j}" for i in (1, 2, 3) for j in (0, 1)]
TRANSFORMER_CHILDREN = ["proj_in", "proj_out"] + [
    f"transformer_blocks_0_{attn}_{p}" for attn in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0")
] + ["transformer_blocks_0_ff_net_0_proj", "transformer_blocks_0_ff_net_2"]
TE_CHILDREN = [f"self_attn_{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")] + ["mlp_fc1", "mlp_fc2"]


def tiny_models(sd2: bool = False, seed: int = 0):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = TinyConfig(sd2=sd2)
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**cfg.text_config())), UNet2DConditionModel(**cfg.unet_config())


def randomize_up(network: lora.LoRANetwork, std: float = 0.05, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.all_loras():
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * std)


def run_models(te, unet, size: int = 16, batch: int = 1):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 49408, (batch, 77), generator=gen)
    x = torch.randn(batch, 4, size, size, generator=gen)
    with torch.no_grad():
        hidden = te(ids)[0]
        return hidden, unet(x, torch.tensor([500] * batch), hidden).sample


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_sd1_module_names_and_counts():
    te, unet = tiny_models()
    network = lora.create_network(1.0, 4, 1, None, te, unet)
    unet_names = {m.lora_name for m in network.unet_loras}
    te_names = {m.lora_name for m in network.text_encoder_loras}
    assert unet_names == {f"lora_unet_{t}_{c}" for t in TRANSFORMERS for c in TRANSFORMER_CHILDREN}
    assert len(unet_names) == 120
    # transformers 5 paths lack "text_model."; the standard names keep it
    assert te_names == {f"lora_te_text_model_encoder_layers_{i}_{c}" for i in (0, 1) for c in TE_CHILDREN}
    keys = set(network.state_dict())
    assert len(keys) == 3 * 132
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    sd = network.state_dict()
    # proj_in is a 1x1 conv in SD1: conv-shaped LoRA with the linear rank
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"].shape == (32, 4, 1, 1)
    assert sd["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape == (4, 32)
    assert sd["lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight"].shape == (512, 4)
    assert sd["lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight"].shape == (64, 4)
    assert sd["lora_te_text_model_encoder_layers_1_mlp_fc1.alpha"].shape == ()
    assert all(float(v) == 1.0 for k, v in sd.items() if k.endswith(".alpha"))
    assert all(float(v.abs().sum()) == 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
    assert all(float(v.abs().sum()) > 0 for k, v in sd.items() if k.endswith("lora_down.weight"))


def test_sd2_linear_projection_and_two_text_encoders():
    te, unet = tiny_models(sd2=True)
    te2, _ = tiny_models(seed=1)
    network = lora.create_network(1.0, 2, 1, None, [te, te2], unet)
    sd = network.state_dict()
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (2, 32)
    names = {m.lora_name for m in network.text_encoder_loras}
    assert len(names) == 24
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in names


def test_forward_math_scale_and_multiplier():
    te, unet = tiny_models()
    network = lora.create_network(1.0, 8, 2, None, te, unet)
    randomize_up(network)
    module = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    weight = module.weight.detach().clone()
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    target = next(m for m in network.unet_loras if m.lora_name == name)
    assert target.scale == pytest.approx(0.25)
    down, up = target.lora_down.weight.detach(), target.lora_up.weight.detach()
    network.apply_to(te, unet)
    x = torch.randn(2, 5, module.in_features)
    with torch.no_grad():
        expected = x @ weight.T + (x @ down.T @ up.T) * 0.25
        assert torch.allclose(module(x), expected, atol=1e-5)
        network.set_multiplier(0.0)
        assert torch.allclose(module(x), x @ weight.T, atol=1e-6)
        network.set_multiplier(-1.5)
        assert torch.allclose(module(x), x @ weight.T - 1.5 * 0.25 * (x @ down.T @ up.T), atol=1e-5)
        # one multiplier per sample
        network.set_multiplier(torch.tensor([0.0, 1.0]))
        out = module(x)
    assert torch.allclose(out[0], x[0] @ weight.T, atol=1e-6)
    assert torch.allclose(out[1], expected[1], atol=1e-5)


def test_alpha_zero_or_none_means_rank():
    te, unet = tiny_models()
    network = lora.create_network(1.0, 4, None, None, te, unet)  # --network_alpha default 1 -> 1/4
    assert {m.scale for m in network.all_loras()} == {0.25}
    network = lora.create_network(1.0, 4, 0, None, te, unet)  # alpha 0 means alpha = rank
    assert {m.scale for m in network.all_loras()} == {1.0}
    assert {float(m.alpha) for m in network.all_loras()} == {4.0}
    module = lora.LoRAModule("x", torch.nn.Linear(3, 3), lora_dim=4, alpha=None)
    assert module.scale == 1.0 and float(module.alpha) == 4.0


def test_apply_wraps_forward_and_respects_flags():
    te, unet = tiny_models()
    org = unet.mid_block.attentions[0].proj_in
    te_org = next(m for n, m in te.named_modules() if n.endswith("layers.0.mlp.fc1"))
    network = lora.create_network(1.0, 4, 1, None, te, unet)
    network.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
    assert unet.mid_block.attentions[0].proj_in is org  # module not replaced
    assert "forward" in org.__dict__  # its forward is wrapped
    assert "forward" not in te_org.__dict__
    assert network.text_encoder_loras == []
    assert all(k.startswith("lora_unet_") for k in network.state_dict())
    assert len(network.state_dict()) == 360
    with pytest.raises(RuntimeError):
        network.apply_to(te, unet)

    te, unet = tiny_models()
    network = lora.create_network(1.0, 4, 1, None, te, unet)
    network.apply_to(te, unet, apply_text_encoder=True, apply_unet=False)
    assert all(k.startswith("lora_te_") for k in network.state_dict()) and len(network.state_dict()) == 36


def test_dropouts_only_in_training():
    te, unet = tiny_models()
    network = lora.create_network(
        1.0, 4, 4, None, te, unet, neuron_dropout=0.5, rank_dropout="0.5", module_dropout="0.3"
    )
    module = network.unet_loras[1]
    assert (module.dropout, module.rank_dropout, module.module_dropout) == (0.5, 0.5, 0.3)
    randomize_up(network)
    network.apply_to(te, unet)
    org = module.org_module
    x = torch.randn(2, 16, org.in_features)
    with torch.no_grad():
        expected = module.org_forward(x) + module.lora_up(module.lora_down(x))
        network.eval()
        assert torch.allclose(org(x), expected, atol=1e-6)
        assert torch.equal(org(x), org(x))
        network.train()
        outs = [org(x) for _ in range(6)]
    assert any(not torch.allclose(o, expected, atol=1e-6) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    # rank dropout masks work for 3-D (tokens) and 4-D (conv) activations
    torch.manual_seed(0)
    network.train()
    hidden, out = run_models(te, unet, size=16, batch=2)
    assert torch.isfinite(out).all()


def test_locon_conv_modules_and_shapes():
    te, unet = tiny_models()
    network = lora.create_network(1.0, 4, 1, None, te, unet, conv_dim="2", conv_alpha="0.5")
    sd = network.state_dict()
    conv1 = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert sd[f"{conv1}.lora_down.weight"].shape == (2, 32, 3, 3)
    assert sd[f"{conv1}.lora_up.weight"].shape == (32, 2, 1, 1)
    assert float(sd[f"{conv1}.alpha"]) == 0.5
    # Linear / 1x1 children of ResNet blocks get the linear rank, like the reference
    assert sd["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"].shape == (4, 128)
    assert sd["lora_unet_up_blocks_0_resnets_0_conv_shortcut.lora_down.weight"].shape == (4, 128, 1, 1)
    down = next(m for m in network.unet_loras if m.lora_name == "lora_unet_down_blocks_0_downsamplers_0_conv")
    assert down.lora_down.stride == (2, 2) and down.lora_down.padding == (1, 1)
    assert "lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight" in sd
    resnets = [n for n, _ in unet.named_modules() if type(_).__name__ == "ResnetBlock2D"]
    conv_names = {m.lora_name for m in network.unet_loras if m.lora_down.weight.shape[2:] == (3, 3)}
    assert len(conv_names) == 2 * len(resnets) + 3 + 3  # conv1/conv2 per ResNet, 3 down- and 3 upsamplers
    # the LoCon module is exact: merged 3x3 conv == conv + up(down(.)) * scale
    x = torch.randn(1, 32, 16, 16)
    org = down.org_module
    with torch.no_grad():
        randomize_up(network)
        expected = org(x) + down.lora_up(down.lora_down(x)) * 0.5
        merged = torch.nn.functional.conv2d(
            x, org.weight + lora.lora_delta(down.lora_up.weight, down.lora_down.weight) * 0.5, org.bias, 2, 1
        )
    assert rel(merged, expected) < 1e-5


def test_no_class_state_mutation():
    te, unet = tiny_models()
    conv = lora.create_network(1.0, 4, 1, None, te, unet, conv_dim="4")
    assert any("resnets" in m.lora_name for m in conv.unet_loras)
    plain = lora.create_network(1.0, 4, 1, None, te, unet)
    assert len(plain.unet_loras) == 120
    assert not any("resnets" in m.lora_name or "samplers" in m.lora_name for m in plain.unet_loras)
    assert lora.UNET_TARGETS == ("Transformer2DModel",)


def test_block_index_mapping():
    assert lora.block_index("lora_unet_down_blocks_0_attentions_0_proj_in") == 1
    assert lora.block_index("lora_unet_down_blocks_0_downsamplers_0_conv") == 3
    assert lora.block_index("lora_unet_down_blocks_3_resnets_1_conv1") == 11
    assert lora.block_index("lora_unet_mid_block_attentions_0_proj_in") == 12
    assert lora.block_index("lora_unet_up_blocks_0_resnets_0_conv1") == 13
    assert lora.block_index("lora_unet_up_blocks_0_upsamplers_0_conv") == 15
    assert lora.block_index("lora_unet_up_blocks_3_attentions_2_proj_out") == 24
    assert lora.block_index("lora_te_text_model_encoder_layers_0_mlp_fc1") == -1


def test_block_dims_and_alphas():
    te, unet = tiny_models()
    dims = [str(i % 5) for i in range(25)]  # slot 1 -> 1, 4 -> 4, 7 -> 2, 12 -> 2, 16 -> 1, 20 -> 0 ...
    alphas = [str(i / 2) for i in range(25)]
    conv_dims = ["3"] * 25
    conv_alphas = [str(i / 4) for i in range(25)]
    network = lora.create_network(
        1.0, 8, 1, None, te, unet, block_dims=",".join(dims), block_alphas=",".join(alphas),
        conv_block_dims=",".join(conv_dims), conv_block_alphas=",".join(conv_alphas),
    )
    for m in network.unet_loras:
        idx = lora.block_index(m.lora_name)
        if m.lora_down.weight.shape[2:] == (3, 3):
            assert m.lora_dim == 3 and float(m.alpha) == idx / 4
        else:
            assert m.lora_dim == idx % 5 and float(m.alpha) == idx / 2
    # slot 20 (up_blocks_2 attentions_1 / resnets_1) has rank 0: only its 3x3 convs (conv_block_dims) remain
    slot20 = [m for m in network.unet_loras if lora.block_index(m.lora_name) == 20]
    assert slot20 and all(m.lora_down.weight.shape[2:] == (3, 3) for m in slot20)
    assert all(m.lora_dim == 8 for m in network.text_encoder_loras)
    with pytest.raises(UserError, match="25 needed"):
        lora.create_network(1.0, 8, 1, None, te, unet, block_dims=",".join(dims[:24]))
    with pytest.raises(UserError, match="block_alphas"):
        lora.create_network(1.0, 8, 1, None, te, unet, block_dims=",".join(dims), block_alphas="a," * 24 + "b")


def test_block_lr_weights_and_param_groups():
    te, unet = tiny_models()
    network = lora.create_network(
        1.0, 4, 1, None, te, unet, down_lr_weight="0,0,1,1,0.5", mid_lr_weight="2", up_lr_weight="cosine"
    )
    assert not any(lora.block_index(m.lora_name) == 1 for m in network.unet_loras)  # lr weight 0 -> no LoRA
    assert len(network.unet_loras) == 108
    groups, descriptions = network.prepare_optimizer_params(5e-4, 1e-3, 1e-5)
    lrs = dict(zip(descriptions, (g["lr"] for g in groups)))
    assert lrs["textencoder"] == 5e-4
    assert lrs["unet_block4"] == pytest.approx(1e-3 * 0.5)
    assert lrs["unet_block7"] == pytest.approx(1e-3 * 1.0)  # padded with 1.0
    assert lrs["unet_block12"] == pytest.approx(2e-3)
    cosine = [math.sin(math.pi * (i / 11) / 2) for i in reversed(range(12))]
    assert lrs["unet_block16"] == pytest.approx(1e-3 * cosine[3])
    assert lrs["unet_block23"] == pytest.approx(1e-3 * cosine[10])
    assert sum(len(g["params"]) for g in groups) == 2 * (12 + 108)
    # presets with +base, and unknown presets
    opts = lora.parse_network_kwargs({"up_lr_weight": "zeros+0.25", "down_lr_weight": "linear"})
    assert opts.up_lr_weight == (0.25,) * 12
    assert opts.down_lr_weight[0] == 0 and opts.down_lr_weight[-1] == pytest.approx(1.0)
    with pytest.raises(UserError, match="did you mean 'cosine'"):
        lora.parse_network_kwargs({"up_lr_weight": "cosin"})
    # block_lr_zero_threshold: weights at or below it become 0 (their blocks get no LoRA)
    opts = lora.parse_network_kwargs({"down_lr_weight": "sine", "block_lr_zero_threshold": "0.2"})
    assert opts.down_lr_weight[:2] == (0.0, 0.0) and opts.down_lr_weight[2] > 0.2
    assert opts.block_dims[1] == 0 and opts.block_dims[3] == 4


def test_loraplus_and_text_encoder_lrs():
    te, unet = tiny_models()
    te2, _ = tiny_models(seed=3)
    network = lora.create_network(
        1.0, 4, 1, None, [te, te2], unet, loraplus_lr_ratio="16", loraplus_unet_lr_ratio="4"
    )
    groups, descriptions = network.prepare_optimizer_params([1e-4, 2e-4], 1e-3, 1e-5)
    assert descriptions == [
        "textencoder1", "textencoder1 plus", "textencoder2", "textencoder2 plus", "unet", "unet plus"
    ]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 16e-4, 2e-4, 32e-4, 1e-3, 4e-3])
    network = lora.create_network(1.0, 4, 1, None, te, unet, loraplus_lr_ratio="16", loraplus_text_encoder_lr_ratio="2")
    groups, descriptions = network.prepare_optimizer_params(1e-4, 1e-3, 1e-5)
    assert dict(zip(descriptions, (g["lr"] for g in groups))) == pytest.approx(
        {"textencoder": 1e-4, "textencoder plus": 2e-4, "unet": 1e-3, "unet plus": 16e-3})
    up_ids = {id(m.lora_up.weight) for m in network.all_loras()}
    for group, description in zip(groups, descriptions):
        assert all((id(p) in up_ids) == description.endswith("plus") for p in group["params"])
    # no LoRA+: one group per part; missing lrs fall back to default_lr; lr 0 drops the group
    network = lora.create_network(1.0, 4, 1, None, te, unet)
    groups, descriptions = network.prepare_optimizer_params(None, None, 3e-4)
    assert descriptions == ["textencoder", "unet"] and [g["lr"] for g in groups] == [3e-4, 3e-4]
    groups, descriptions = network.prepare_optimizer_params(0.0, 1e-3, 3e-4)
    assert descriptions == ["unet"]
    groups, _ = network.prepare_optimizer_params(None, None, None)
    assert all("lr" not in g for g in groups)


def test_max_norm_regularization():
    te, unet = tiny_models()
    network = lora.create_network(1.0, 4, 4, None, te, unet)
    big = network.unet_loras[:10]
    with torch.no_grad():
        for m in big:
            m.lora_up.weight.normal_(std=1.0)

    def norms():
        with torch.no_grad():
            deltas = [lora.lora_delta(m.lora_up.weight, m.lora_down.weight) * m.scale for m in network.unet_loras]
            return [float(d.norm()) for d in deltas]

    before = norms()
    threshold = 0.5
    expected_scaled = sum(n > threshold for n in before)
    assert expected_scaled == 10
    keys_scaled, mean_norm, max_norm = network.apply_max_norm_regularization(threshold, "cpu")
    after = norms()
    assert keys_scaled == expected_scaled
    assert max(after) == pytest.approx(threshold, rel=1e-4)
    assert max_norm == pytest.approx(threshold, rel=1e-4)
    assert mean_norm == pytest.approx(sum(after) / len(network.all_loras()), rel=1e-4)
    assert after[10:] == before[10:]


def test_merge_matches_applied_forward():
    te, unet = tiny_models()
    te_m, unet_m = copy.deepcopy(te), copy.deepcopy(unet)
    _, base = run_models(te, unet)
    network = lora.create_network(0.7, 4, 2, None, te, unet, conv_dim="2", conv_alpha="1")
    randomize_up(network)
    weights = network.state_dict()
    network.apply_to(te, unet)
    network.eval()
    hidden_a, out_a = run_models(te, unet)
    merging, sd = lora.create_network_from_weights(
        0.7, None, None, te_m, unet_m, weights_sd=weights, for_inference=True
    )
    merging.merge_to(te_m, unet_m, sd, torch.float32, "cpu")
    hidden_m, out_m = run_models(te_m, unet_m)
    assert rel(out_a, base) > 1e-2  # the LoRA has an effect
    assert rel(hidden_m, hidden_a) < 1e-5
    assert rel(out_m, out_a) < 1e-5
    with pytest.raises(RuntimeError):
        network.merge_to(te, unet, weights)


def test_training_step_updates_only_lora():
    te, unet = tiny_models()
    network = lora.create_network(1.0, 4, 1, None, te, unet)
    network.apply_to(te, unet)
    te.requires_grad_(False)
    unet.requires_grad_(False)
    network.prepare_grad_etc(te, unet)
    network.on_epoch_start(te, unet)
    groups, _ = network.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    optimizer = torch.optim.AdamW(groups)
    x = torch.randn(1, 4, 16, 16)
    ids = torch.randint(0, 49408, (1, 77))
    loss = unet(x, torch.tensor([10]), te(ids)[0]).sample.pow(2).mean()
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in unet.parameters())
    ups = [m.lora_up.weight for m in network.all_loras()]
    assert all(float(w.detach().abs().sum()) > 0 for w in ups)
    assert sum(1 for _ in network.get_trainable_params()) == 2 * 132


def test_fp32_lora_on_bf16_module_and_merge_dtype():
    org = torch.nn.Linear(16, 8).to(torch.bfloat16)
    module = lora.LoRAModule("lora_unet_x", org, lora_dim=4, alpha=4)
    torch.nn.init.normal_(module.lora_up.weight)
    weight = org.weight.detach().float().clone()
    module.apply_to()
    x = torch.randn(3, 16).to(torch.bfloat16)
    with torch.no_grad():
        out = org(x)
        delta = lora.lora_delta(module.lora_up.weight, module.lora_down.weight)
        expected = x.float() @ (weight + delta).T + org.bias.float()
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, atol=0.1, rtol=0.02)

    target = torch.nn.Linear(16, 8).to(torch.bfloat16)
    merger = lora.LoRAModule("lora_unet_x", target, lora_dim=4, alpha=4)
    before = target.weight.detach().float().clone()
    merger.merge_to(module.state_dict(), 0.5, None, "cpu")
    assert target.weight.dtype == torch.bfloat16
    assert torch.allclose(target.weight.float(), before + 0.5 * delta, atol=0.05)


def test_network_from_weights_keeps_training_options():
    te, unet = tiny_models()
    source = lora.create_network(1.0, 4, 1, None, te, unet, conv_dim="2")
    network, _ = lora.create_network_from_weights(
        1.0, None, None, te, unet, weights_sd=source.state_dict(),
        conv_dim="8", rank_dropout="0.2", up_lr_weight="zeros", loraplus_lr_ratio="4",
    )
    assert {m.lora_name for m in network.all_loras()} == {m.lora_name for m in source.all_loras()}
    assert {m.lora_dim for m in network.unet_loras} == {2, 4}  # ranks from the weights, conv_dim=8 ignored
    assert {m.rank_dropout for m in network.all_loras()} == {0.2}
    groups, descriptions = network.prepare_optimizer_params(1e-4, 1e-3, 1e-4)
    lrs = dict(zip(descriptions, (g["lr"] for g in groups)))
    blocks = {int(d.split()[0][len("unet_block"):]) for d in descriptions if d.startswith("unet_block")}
    assert blocks == {1, 3, 4, 6, 7, 9, 10, 12}  # up blocks have LR weight 0: no groups
    assert lrs["unet_block4"] == pytest.approx(1e-3) and lrs["unet_block4 plus"] == pytest.approx(4e-3)
    assert lrs["textencoder plus"] == pytest.approx(4e-4)


def _dropout_module(**dropouts) -> tuple[lora.LoRAModule, torch.nn.Linear]:
    torch.manual_seed(0)
    org = torch.nn.Linear(8, 6)
    module = lora.LoRAModule("lora_unet_x", org, lora_dim=4, alpha=2, **dropouts)
    torch.nn.init.normal_(module.lora_up.weight)
    module.apply_to()
    return module, org


def test_dropout_kinds_follow_the_reference_math():
    x = torch.randn(3, 5, 8)
    # rank_dropout: a [batch, rank] mask on the down output, and the scale divided by (1 - p)
    module, org = _dropout_module(rank_dropout=0.5)
    with torch.no_grad():
        torch.manual_seed(3)
        out = org(x)
        torch.manual_seed(3)
        mask = (torch.rand(3, 4) > 0.5).unsqueeze(1)
        expected = module.org_forward(x) + module.lora_up(module.lora_down(x) * mask) * (0.5 / 0.5)
    assert torch.allclose(out, expected, atol=1e-6)
    # neuron dropout (--network_dropout): F.dropout on the down output, scale unchanged
    module, org = _dropout_module(dropout=0.25)
    with torch.no_grad():
        torch.manual_seed(4)
        out = org(x)
        torch.manual_seed(4)
        expected = module.org_forward(x) + module.lora_up(torch.nn.functional.dropout(module.lora_down(x), 0.25)) * 0.5
    assert torch.allclose(out, expected, atol=1e-6)
    # module_dropout: the whole LoRA is skipped for some calls, fully applied for the others
    module, org = _dropout_module(module_dropout=0.5)
    with torch.no_grad():
        plain = module.org_forward(x)
        full = plain + module.lora_up(module.lora_down(x)) * 0.5
        outs = [org(x) for _ in range(24)]
    skipped = [torch.equal(o, plain) for o in outs]
    assert all(s or torch.allclose(o, full, atol=1e-6) for s, o in zip(skipped, outs))
    assert 0 < sum(skipped) < len(outs)


def test_real_sd_sizes_have_the_reference_module_counts():
    """SD1.5: 72 text encoder and 192 UNet modules (278 with conv_dim), as sd-scripts logs; SD2.1: 23 layers."""
    from tests.test_models_conversion import _real_components

    for sd2, te_count in ((False, 72), (True, 138)):
        parts = _real_components(sd2)  # meta device: shapes only
        network = lora.create_network(1.0, 4, 1, None, parts["text_encoder"], parts["unet"])
        assert (len(network.text_encoder_loras), len(network.unet_loras)) == (te_count, 192)
        down = network.state_dict()["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2.lora_down.weight"]
        assert down.shape == (4, 1280)
        locon = lora.create_network(1.0, 4, 1, None, None, parts["unet"], conv_dim="4")
        assert len(locon.unet_loras) == 278
