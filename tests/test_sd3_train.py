"""sd3_train.py on a tiny SD3.5 Medium: the saved single file (MMDiT + VAE + the trained text encoders) loads
back bit-exact, per-encoder learning rates reach the right weights, --num_last_block_to_freeze leaves whole
blocks unchanged, --block_lr gives each block its rate, --blockwise_fused_optimizers gives the plain step,
--use_t5xxl_cache_only trains the CLIPs on cached T5 outputs without T5, a diffusers folder loads in
StableDiffusion3Pipeline, and bad options are one message."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from family_helpers import with_dataset
from library.errors import UserError
from library.models.sd3.tiny import TinySD3Config, save_tiny_sd3_files
from tests.train_helpers import dataset_toml


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3ft")
    return with_dataset(root, save_tiny_sd3_files(root / "m", TinySD3Config(variant="5-medium")))


def _argv(sd3, out, *, steps=2, extra=()):
    return ["--pretrained_model_name_or_path", str(sd3["sd3"]), "--dataset_config", str(sd3["data"]),
            "--output_dir", str(out), "--output_name", "ft", "--learning_rate", "1e-3", "--max_train_steps",
            str(steps), "--seed", "1", "--max_data_loader_n_workers", "0", "--tokenizer_cache_dir",
            str(sd3["tokenizer_cache_dir"]), "--t5xxl_max_token_length", "8", *extra]


def _main(argv):
    import sd3_train

    torch.set_num_threads(1)
    return sd3_train.main(argv)


def _load(model: Path, tokenizers: Path, **parts):
    from library.models.families import resolve_family

    args = argparse.Namespace(pretrained_model_name_or_path=str(model), clip_l=None, clip_g=None, t5xxl=None,
                              vae=None, mixed_precision="no", tokenizer_cache_dir=str(tokenizers),
                              pos_emb_random_crop_rate=0.0, enable_scaled_pos_embed=False)
    for k, v in parts.items():
        setattr(args, k, str(v))
    family = resolve_family(args, ("sd3",))
    return family.spec.load(args, family, device="cpu", dtype=torch.float32)


def test_fine_tunes_and_saves_a_single_file_that_loads_back(sd3, tmp_path):
    base = _load(sd3["sd3"], sd3["tokenizer_cache_dir"])
    out = _main(_argv(sd3, tmp_path / "out", extra=[
        "--train_text_encoder", "--learning_rate_te1", "1e-3", "--learning_rate_te2", "0",
        "--num_last_block_to_freeze", "1", "--cache_latents", "--save_clip"]))
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys)
    assert any(k.startswith("text_encoders.clip_g.transformer.") for k in keys)
    assert not any(k.startswith("text_encoders.t5xxl.") for k in keys)
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium"
    tuned = _load(out, sd3["tokenizer_cache_dir"], t5xxl=sd3["t5xxl"])
    b, t = base.unet.state_dict(), tuned.unet.state_dict()
    assert not torch.equal(b["transformer_blocks.0.attn.to_q.weight"], t["transformer_blocks.0.attn.to_q.weight"])
    assert all(torch.equal(b[k], t[k]) for k in b if k.startswith("transformer_blocks.1."))  # frozen last block
    l0, l1 = base.text_encoders[0].state_dict(), tuned.text_encoders[0].state_dict()
    g0, g1 = base.text_encoders[1].state_dict(), tuned.text_encoders[1].state_dict()
    key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(l0[key], l1[key]) and torch.equal(g0[key], g1[key])  # CLIP-G at lr 0


def test_diffusers_folder_out_loads_in_the_pipeline(sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = _main(_argv(sd3, tmp_path / "out", extra=["--save_model_as", "diffusers", "--cache_latents"]))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out), local_files_only=True)
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    tuned = _load(out, sd3["tokenizer_cache_dir"])
    assert tuned.family.base_model_version == "5-medium"


@pytest.mark.parametrize("extra, message", [
    (["--num_last_block_to_freeze", "3"], "has only 2 joint blocks; give at most 2"),
    (["--train_t5xxl"], "--train_t5xxl needs --train_text_encoder"),
    (["--learning_rate_te3", "1e-4", "--train_text_encoder"], "--learning_rate_te3 is given but that text encoder"),
    (["--blockwise_fused_optimizers", "--gradient_accumulation_steps", "2"], "--gradient_accumulation_steps > 1"),
    (["--fused_optimizer_groups", "4"], "use --blockwise_fused_optimizers"),
    (["--block_lr", "1e-4,1e-4,1e-4"], "--block_lr has 3 values; this SD3.5 Medium model has 2 joint blocks: give 2"),
    (["--block_lr", "1e-4,x"], "give comma-separated numbers"),
    (["--block_lr", "1e-4,-1"], "must be finite and not negative"),
    (["--use_t5xxl_cache_only"], "add --train_text_encoder or use --cache_text_encoder_outputs"),
    (["--use_t5xxl_cache_only", "--train_text_encoder", "--train_t5xxl"], "cannot be combined with --train_t5xxl"),
    (["--fp8_base"], "--fp8_base / --fp8_base_unet store frozen weights in float8, but this script trains the "
                     "transformer itself"),
    (["--blocks_to_swap", "1", "--gradient_checkpointing"], "needs --fused_backward_pass or --blockwise_fused"),
    (["--save_model_as", "ckpt"], "SD3 models are saved as safetensors"),
])
def test_bad_options_are_one_message(sd3, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        _main(_argv(sd3, tmp_path / "out", extra=extra))


def _prepare(argv):
    from library.config.arguments import SUPPORT_SDXL_TRAIN
    from library.config.run_config import load_run_config
    from library.models.sd3.full import SD3FullWeightRecipe
    from library.training.full_recipe import FINE_TUNING
    from library.training.loop import prepare_training

    import sd3_train

    torch.set_num_threads(1)
    args = load_run_config(sd3_train.build_parser(), argv)
    return prepare_training(args, SD3FullWeightRecipe(args, FINE_TUNING), SUPPORT_SDXL_TRAIN, families=("sd3",))


def test_block_lr_gives_each_block_its_learning_rate(sd3, tmp_path):
    run = _prepare(_argv(sd3, tmp_path / "a", extra=["--block_lr", "2e-3,3e-3", "--train_text_encoder",
                                                     "--learning_rate_te2", "4e-4"]))
    lrs = dict(zip(run.lr_names, (g["lr"] for g in run.optimizer.param_groups)))
    assert lrs == {"unet_embedders": 1e-3, "unet_joint0": 2e-3, "unet_joint1": 3e-3, "unet_final": 1e-3,
                   "textencoder1": 1e-3, "textencoder2": 4e-4}
    block1 = {id(p) for p in run.models.unet.transformer_blocks[1].parameters()}
    assert {id(p) for p in run.optimizer.param_groups[2]["params"]} == block1
    # depth + 2 values: the embedders first, the final layer last; a rate of 0 leaves a block unchanged
    base = _load(sd3["sd3"], sd3["tokenizer_cache_dir"]).unet.state_dict()
    out = _main(_argv(sd3, tmp_path / "b", extra=["--block_lr", "0,1e-3,0,0", "--cache_latents",
                                                   "--save_precision", "float"]))
    tuned = _load(out, sd3["tokenizer_cache_dir"], clip_l=sd3["clip_l"], clip_g=sd3["clip_g"],
                  t5xxl=sd3["t5xxl"]).unet.state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.startswith("transformer_blocks.0.") for k in changed)


def test_blockwise_fused_optimizers_give_the_plain_step(sd3, tmp_path):
    common = ["--max_grad_norm", "0", "--save_precision", "float", "--train_text_encoder", "--cache_latents",
              "--block_lr", "1e-3,2e-3"]
    plain = _main(_argv(sd3, tmp_path / "a", extra=common))
    fused = _main(_argv(sd3, tmp_path / "b", extra=common + ["--blockwise_fused_optimizers"]))
    from safetensors.torch import load_file

    a, b = load_file(str(plain)), load_file(str(fused))
    assert a.keys() == b.keys()
    base = load_file(str(sd3["sd3"]))
    assert not torch.equal(a["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"],
                           base["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_use_t5xxl_cache_only_trains_the_clips_on_cached_t5_outputs_without_t5(sd3, tmp_path):
    from safetensors.torch import load_file

    extra = ["--train_text_encoder", "--cache_latents", "--save_precision", "float", "--max_grad_norm", "0"]
    run = _prepare(_argv(sd3, tmp_path / "p", extra=extra + ["--use_t5xxl_cache_only",
                                                             "--cache_text_encoder_outputs_to_disk"]))
    assert next(run.models.text_encoders[2].parameters()).device.type == "meta"  # T5 freed after caching
    assert run.text.t5.encoded == 2 and run.text.t5.encoders_released  # each caption once
    assert len(list((tmp_path / "p" / ".cache" / "text_encoder_outputs").glob("*.safetensors"))) == 2
    plain = load_file(str(_main(_argv(sd3, tmp_path / "a", extra=extra))))
    cached = load_file(str(_main(_argv(sd3, tmp_path / "b", extra=extra + ["--use_t5xxl_cache_only"]))))
    assert plain.keys() == cached.keys()
    clip_l = load_file(str(sd3["clip_l"]))
    key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(cached[f"text_encoders.clip_l.transformer.{key}"], clip_l[key])  # CLIP-L trained
    for k in plain:
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)


def test_use_t5xxl_cache_only_refuses_captions_that_change(sd3, tmp_path):
    images = Path(sd3["data"].read_text(encoding="utf-8").split("image_dir = '")[1].split("'")[0])
    toml = dataset_toml(tmp_path / "shuffle.toml", images, extra_subset="shuffle_caption = true")
    argv = _argv(sd3, tmp_path / "out", extra=["--use_t5xxl_cache_only", "--train_text_encoder"])
    argv[argv.index("--dataset_config") + 1] = str(toml)
    with pytest.raises(UserError, match=r"--use_t5xxl_cache_only: T5's outputs are computed once per caption, but "
                                        r"captions change every step \(datasets\[0\].subsets\[0\]: shuffle_caption\)"):
        _main(argv)


def test_use_t5xxl_cache_only_caches_the_sample_prompts_too(sd3, tmp_path):
    """As sd-scripts: the sample prompts' T5 outputs are cached with the captions, so T5 is freed and samples
    are still made (with their negative prompt)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat --n blurry --w 64 --h 64 --d 7 --s 2 --l 4.0\n", encoding="utf-8")
    extra = ["--train_text_encoder", "--use_t5xxl_cache_only", "--cache_latents", "--sample_prompts", str(prompts),
             "--sample_every_n_steps", "1"]
    run = _prepare(_argv(sd3, tmp_path / "p", extra=extra))
    assert next(run.models.text_encoders[2].parameters()).device.type == "meta"
    assert run.text.t5.encoded == 4  # two captions, the prompt and its negative prompt
    _main(_argv(sd3, tmp_path / "out", extra=extra))
    assert len(list((tmp_path / "out" / "sample").glob("*.png"))) == 2
