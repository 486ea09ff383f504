"""lumina_train.py (full fine-tuning) on the tiny Lumina 2 model: single-file saves that load back, the per-parameter
fused update of --blockwise_fused_optimizers and the streaming --mem_eff_save give the same weights as the plain
ways, bit-exact resume, --cpu_offload_checkpointing's hooks change no number, and refusals before any model loads."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from family_helpers import (LATENT_BUCKETS, assert_resume_is_bit_exact, captioned_folder, forbid_loading, in_json_argv,
                            prepare_latents_refuses, with_dataset)
from library.errors import UserError
from library.models.lumina.tiny import build_tiny_lumina, save_tiny_lumina_files
from train_helpers import make_images


@pytest.fixture(scope="module")
def lumina(tmp_path_factory):
    root = tmp_path_factory.mktemp("lumina_ft")
    return with_dataset(root, save_tiny_lumina_files(root / "model", seed=0))


def _argv(lumina, out, *, steps=2, extra=()):
    return ["--pretrained_model_name_or_path", str(lumina["lumina"]), "--gemma2", str(lumina["gemma2"]),
            "--ae", str(lumina["ae"]), "--tokenizer_cache_dir", str(lumina["tokenizer_cache_dir"]),
            "--dataset_config", str(lumina["data"]), "--output_dir", str(out), "--output_name", "ft",
            "--gemma2_max_token_length", "16", "--learning_rate", "1e-3", "--seed", "1", "--max_train_steps",
            str(steps), "--max_data_loader_n_workers", "0", "--cache_latents", "--max_grad_norm", "0", *extra]


def _main(argv):
    import lumina_train

    torch.set_num_threads(1)
    return lumina_train.main(argv)


def test_fine_tunes_and_saves_the_single_file_layout(lumina, tmp_path):
    from library.models.lumina.loading import load_transformer

    out = _main(_argv(lumina, tmp_path / "out", steps=3))
    saved, base = load_file(str(out)), load_file(str(lumina["lumina"]))
    assert saved.keys() == base.keys() and "layers.0.attention.qkv.weight" in saved
    assert not torch.equal(saved["layers.0.attention.qkv.weight"], base["layers.0.attention.qkv.weight"])
    assert torch.equal(saved["norm_final.weight"], base["norm_final.weight"])
    meta = safe_open(str(out), "pt").metadata()
    assert meta["modelspec.architecture"] == "lumina-2" and meta["ss_text_encoder_trained"] == "False"
    assert load_transformer(out, torch.float32).config.num_layers == 2


def test_blockwise_fused_optimizers_and_mem_eff_save_give_the_plain_weights(lumina, tmp_path):
    plain = load_file(str(_main(_argv(lumina, tmp_path / "a", steps=3))))
    fused_file = _main(_argv(lumina, tmp_path / "b", steps=3, extra=["--blockwise_fused_optimizers", "--mem_eff_save"]))
    fused = load_file(str(fused_file))
    assert plain.keys() == fused.keys()
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=0, atol=1e-6, msg=key)
    assert "sshs_model_hash" not in safe_open(str(fused_file), "pt").metadata()


def test_resume_is_bit_exact_with_blockwise_fused_optimizers(lumina, tmp_path):
    extra = ["--save_every_n_steps", "2", "--save_state", "--blockwise_fused_optimizers", "--noise_offset", "0.05"]
    assert_resume_is_bit_exact("lumina_train.py", lambda out, more: _argv(lumina, out, steps=4, extra=more), tmp_path,
                               extra, name="ft")


def test_offloading_checkpoint_changes_no_gradient():
    """--cpu_offload_checkpointing (the shared offloading checkpoint) on the Lumina transformer."""
    from library.training.memory import offloading_checkpoint

    grads = []
    for offload in (False, True):
        model = build_tiny_lumina(seed=5)["transformer"]
        model.enable_gradient_checkpointing(offloading_checkpoint(torch.device("cpu")) if offload else None)
        g = torch.Generator().manual_seed(0)
        out = model(hidden_states=torch.randn(2, 16, 8, 8, generator=g), timestep=torch.tensor([0.2, 0.7]),
                    encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
                    encoder_attention_mask=torch.ones(2, 8, dtype=torch.bool)).sample
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


@pytest.mark.parametrize("extra, message", [
    (["--train_text_encoder"], "trains the transformer only"),
    (["--save_model_as", "diffusers"], "saves the single-file"),
    (["--fused_optimizer_groups", "4"], "--fused_optimizer_groups does not work in sd-scripts"),
    (["--blocks_to_swap", "4"], "--blocks_to_swap 4: this model has 2 main layers, and at most 0"),
    (["--fp8_base_unet"], "this script trains the transformer itself"),
    (["--cpu_offload_checkpointing", "--gradient_checkpointing"], "this machine has no CUDA device"),
    (["--blockwise_fused_optimizers", "--gradient_accumulation_steps", "2"], "--gradient_accumulation_steps > 1"),
    (["--blockwise_fused_optimizers", "--fused_backward_pass", "--optimizer_type", "AdaFactor"], "use one of them"),
])
def test_bad_input_is_one_message_before_any_model_loads(lumina, tmp_path, monkeypatch, extra, message):
    import library.models.lumina.loading as loading

    forbid_loading(monkeypatch, loading, "load_lumina_models")
    with pytest.raises(UserError, match=message):
        _main(_argv(lumina, tmp_path / "out", extra=extra))


def test_prepare_buckets_latents_writes_lumina_latents_that_lumina_train_reads(lumina, tmp_path):
    """finetune/prepare_buckets_latents.py --lumina with the FLUX AE writes 16-channel *_lumina.npz entries keyed by
    the AE as lumina_train.py loads it (--ae); training with --in_json --cache_latents_to_disk finds every entry
    valid and rewrites none (an entry with another key would be re-encoded and rewritten)."""
    import json

    import numpy as np

    from library.models.flux.loading import load_ae
    from library.tools.prepare_latents import main as prepare
    from library.training.preparation import vae_cache_key

    folder, in_json, out_json = captioned_folder(tmp_path)
    base = [str(folder), str(in_json), str(out_json)]
    prepare_latents_refuses(base, [
        (lumina["lumina"], ["--lumina"], "this is the Lumina 2 transformer"),
        (lumina["ae"], [], "16-channel autoencoder given alone; add --flux .* or --lumina"),
        (lumina["ae"], ["--flux", "--lumina"], "--flux and --lumina name different"),
        (lumina["gemma2"], ["--lumina"], "no VAE weights found")])
    assert not list(folder.glob("*.npz")) and not out_json.exists()
    assert prepare([*base, str(lumina["ae"]), "--lumina", "--max_resolution", "64,64", *LATENT_BUCKETS]) == 0
    npz = sorted(folder.glob("*.npz"))
    assert [p.name for p in npz] == ["img0_0064x0064_lumina.npz", "img1_0064x0064_lumina.npz"]
    training_key = vae_cache_key(load_ae(str(lumina["ae"]), torch.float32), torch.float32)
    for path in npz:
        with np.load(path) as f:
            assert f["latents"].shape == (16, 8, 8) and np.isfinite(f["latents"]).all()
            assert json.loads(str(f["cache_meta"]))["key"]["vae"] == training_key
    assert json.loads(out_json.read_text(encoding="utf-8"))["img0"]["train_resolution"] == [64, 64]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in npz}
    argv = in_json_argv(_argv(lumina, tmp_path / "out", steps=1), folder, out_json)
    argv[argv.index("--cache_latents")] = "--cache_latents_to_disk"
    out = _main(argv)
    assert out is not None and out.is_file()
    assert sorted(folder.glob("*.npz")) == npz
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in npz} == before


def test_prepare_buckets_latents_recognises_a_diffusers_lumina2_folder(tmp_path):
    """A Lumina2Pipeline folder needs no --lumina: its vae/ makes *_lumina.npz keyed like the AE lumina training
    loads from that folder."""
    import json

    import numpy as np
    from diffusers import AutoencoderKL

    from library.models.lumina.tiny import save_tiny_lumina_diffusers
    from library.tools.prepare_latents import main as prepare
    from library.training.preparation import vae_cache_key

    model = save_tiny_lumina_diffusers(tmp_path / "lumina2")
    folder = make_images(tmp_path / "train", count=1)
    in_json, out_json = tmp_path / "meta.json", tmp_path / "meta_lat.json"
    in_json.write_text(json.dumps({"img0": {"caption": "sks"}}), encoding="utf-8")
    assert prepare([str(folder), str(in_json), str(out_json), str(model), "--max_resolution", "64,64",
                    "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16"]) == 0
    [npz] = folder.glob("*.npz")
    assert npz.name == "img0_0064x0064_lumina.npz"
    training_key = vae_cache_key(AutoencoderKL.from_pretrained(model / "vae", torch_dtype=torch.float32), torch.float32)
    with np.load(npz) as f:
        assert f["latents"].shape == (16, 8, 8)
        assert json.loads(str(f["cache_meta"]))["key"]["vae"] == training_key
