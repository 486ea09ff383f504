"""SD3.5 Medium's --pos_emb_random_crop_rate and --enable_scaled_pos_embed: which window of which table the MMDiT
adds to its patches, both options trained end to end (LoRA and sd3_train.py), and refused for the other variants."""

from __future__ import annotations

import argparse

import pytest
import torch
from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed

from family_helpers import trained, with_dataset
from library.errors import UserError
from library.models.families import resolve_family
from library.models.sd3.pos_embed import (
    PositionEmbedding, install_position_embedding, latent_patch_sides, scaled_table,
)
from library.models.sd3.tiny import TinySD3Config, build_tiny_sd3, save_tiny_sd3_files
from train_helpers import load_lora, prepare_run, run_main, train_args


def _transformer():
    return build_tiny_sd3(TinySD3Config(variant="5-medium"))["transformer"]


def _inputs(size=8):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, size, size, generator=g),
                encoder_hidden_states=torch.randn(1, 5, 48, generator=g),
                pooled_projections=torch.randn(1, 40, generator=g), timestep=torch.tensor([500.0]))


def _window(table, grid, top, left, rows, cols):
    return table.reshape(1, grid, grid, -1)[:, top:top + rows, left:left + cols, :].reshape(1, rows * cols, -1)


def test_random_crop_takes_the_window_at_the_drawn_place_while_training_only():
    transformer = _transformer()
    patch = transformer.pos_embed
    table, grid = patch.pos_embed, patch.pos_embed_max_size  # 32 x 32 positions
    centre = PatchEmbed.cropped_pos_embed(patch, 8, 8)  # diffusers' own centred 4 x 4 window
    with torch.no_grad():
        plain = transformer(**_inputs()).sample
    embedding = install_position_embedding(transformer, crop_rate=1.0)
    assert patch.cropped_pos_embed is embedding and embedding.training is False
    assert torch.equal(patch.cropped_pos_embed(8, 8), centre)  # not training: always the centre
    with torch.no_grad():
        assert torch.equal(transformer(**_inputs()).sample, plain)

    embedding.training = True
    places = set()
    for seed in range(6):
        torch.manual_seed(seed)
        got = patch.cropped_pos_embed(8, 8)
        torch.manual_seed(seed)  # sd-scripts' draws: rand (crop or not), then top, then left
        assert torch.rand(1).item() < 1.0
        top, left = torch.randint(0, grid - 4 + 1, (1,)).item(), torch.randint(0, grid - 4 + 1, (1,)).item()
        assert torch.equal(got, _window(table, grid, top, left, 4, 4))
        places.add((top, left))
    assert len(places) > 1 and (14, 14) not in places  # (14, 14) is the centre
    torch.manual_seed(0)
    with torch.no_grad():
        cropped = transformer(**_inputs()).sample
    assert (cropped - plain).abs().max() > 1e-3  # the model sees another window

    half = PositionEmbedding(patch, crop_rate=0.5)
    half.training = True
    torch.manual_seed(0)
    outcomes = [torch.equal(half(8, 8), centre) for _ in range(40)]
    assert 5 < sum(outcomes) < 35  # about half the steps crop at random


def test_scaled_tables_per_resolution():
    assert latent_patch_sides([(64, 64), (128, 96), (64, 64), (96, 128)]) == [4, 6]
    assert latent_patch_sides([(1024, 1024), (512, 512)]) == [32, 64]
    # the table of a 4-patch resolution: 6 x 6 positions; its centred 4 x 4 window spans 16 units, which is the
    # diffusers table of a 4 x 4 grid with base size 16 (an independent formula)
    table = scaled_table(32, 4)
    assert table.shape == (1, 36, 32)
    reference = get_2d_sincos_pos_embed(32, 4, base_size=16, interpolation_scale=1.0, output_type="pt").float()
    assert torch.allclose(_window(table, 6, 1, 1, 4, 4)[0], reference, atol=1e-6)
    assert scaled_table(1536, 64).shape == (1, 96 * 96, 1536)  # SD3.5 Medium at 1024 px

    transformer = _transformer()
    patch = transformer.pos_embed
    with torch.no_grad():
        plain = transformer(**_inputs()).sample
    embedding = install_position_embedding(transformer, crop_rate=0.0, scaled_sides=[4, 8])
    assert sorted(embedding.tables) == [4, 8] and embedding.area_bounds == [(40, 4), (144, 8)]
    assert torch.allclose(patch.cropped_pos_embed(8, 8)[0], reference, atol=1e-6)  # a 64 px latent: table 4
    assert torch.equal(patch.cropped_pos_embed(16, 16), _window(scaled_table(32, 8), 12, 2, 2, 8, 8))
    assert torch.equal(embedding.table_for(4, 12), embedding.tables[8])  # area 48 > 40: the 8-patch table
    wide = patch.cropped_pos_embed(8, 40)  # 4 x 20 patches: wider than the 12-wide table, one of side 20
    assert wide.shape == (1, 80, 32) and sorted(embedding.tables) == [4, 8, 20]
    with torch.no_grad():
        scaled = transformer(**_inputs()).sample
    assert (scaled - plain).abs().max() > 1e-3


def _args(**kw):
    base = dict(pretrained_model_name_or_path=None, clip_l=None, clip_g=None, t5xxl=None, vae=None,
                mixed_precision="no", tokenizer_cache_dir=None, pos_emb_random_crop_rate=0.0,
                enable_scaled_pos_embed=False)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("variant,name", [("medium", "SD3 Medium"), ("5-large", "SD3.5 Large")])
def test_refused_for_the_other_variants_before_anything_loads(variant, name, tmp_path):
    files = save_tiny_sd3_files(tmp_path, TinySD3Config(variant=variant))
    with pytest.raises(UserError) as err:
        resolve_family(_args(pretrained_model_name_or_path=str(files["sd3"]), pos_emb_random_crop_rate=0.2,
                             enable_scaled_pos_embed=True), ("sd3",))
    text = str(err.value)
    for flag in ("--pos_emb_random_crop_rate", "--enable_scaled_pos_embed"):
        assert f"{flag} is an SD3.5 Medium option, and this model is {name}" in text
    medium = save_tiny_sd3_files(tmp_path / "m", TinySD3Config(variant="5-medium"))
    family = resolve_family(_args(pretrained_model_name_or_path=str(medium["sd3"]), pos_emb_random_crop_rate=0.2,
                                  enable_scaled_pos_embed=True), ("sd3",))
    assert family.base_model_version == "5-medium"


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3pos")
    return with_dataset(root, save_tiny_sd3_files(root / "m", TinySD3Config(variant="5-medium")))


def _argv(sd3, out, extra=(), steps=3):
    return train_args(sd3["sd3"], out, config=sd3["data"], steps=steps) + [
        "--tokenizer_cache_dir", str(sd3["tokenizer_cache_dir"]), "--t5xxl_max_token_length", "8",
        "--cache_latents", "--pos_emb_random_crop_rate", "0.5", "--enable_scaled_pos_embed", *extra]


def test_lora_trains_with_both_options(sd3, tmp_path):
    from library.models.sd3.recipe import SD3LoRARecipe

    run = prepare_run(_argv(sd3, tmp_path / "p", ["--network_train_unet_only"]), script="sd3_train_network",
                      recipe=SD3LoRARecipe, families=("sd3",))
    embedding = run.recipe.position
    assert run.models.unet.pos_embed.cropped_pos_embed is embedding
    assert (embedding.crop_rate, sorted(embedding.tables)) == (0.5, [4])  # 64 px: 8 latents, 4 patches
    run.recipe.train_mode(True)
    assert embedding.training
    run.recipe.train_mode(False)
    assert not embedding.training

    # trained end to end, and a resumed run draws the same crops: bit-exact
    extra = ["--save_state", "--save_every_n_steps", "2"]
    full = run_main(_argv(sd3, tmp_path / "a", extra, steps=4), script="sd3_train_network")
    state = tmp_path / "a" / "lora-step00000002-state"
    resumed = run_main(_argv(sd3, tmp_path / "b", extra + ["--resume", str(state)], steps=4),
                       script="sd3_train_network")
    a, meta = load_lora(full)
    b, _ = load_lora(resumed)
    assert meta["ss_base_model_version"] == "5-medium"
    assert trained(a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_fine_tuning_trains_with_both_options(sd3, tmp_path):
    from safetensors import safe_open

    argv = ["--pretrained_model_name_or_path", str(sd3["sd3"]), "--dataset_config", str(sd3["data"]),
            "--output_dir", str(tmp_path / "out"), "--output_name", "ft", "--learning_rate", "1e-3",
            "--max_train_steps", "2", "--seed", "1", "--max_data_loader_n_workers", "0", "--tokenizer_cache_dir",
            str(sd3["tokenizer_cache_dir"]), "--t5xxl_max_token_length", "8", "--cache_latents",
            "--pos_emb_random_crop_rate", "0.5", "--enable_scaled_pos_embed"]
    out = run_main(argv, script="sd3_train")
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        pos = f.get_tensor("model.diffusion_model.pos_embed")
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in keys
    assert pos.shape == (1, 32 * 32, 32)  # the saved table is the model's own, not a scaled one
