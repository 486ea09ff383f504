"""lumina_train.py (full fine-tuning) on the tiny Lumina 2 model: single-file saves that load back, the per-parameter
fused update of --blockwise_fused_optimizers and the streaming --mem_eff_save give the same weights as the plain
ways, bit-exact resume, --cpu_offload_checkpointing's hooks change no number, and refusals before any model loads."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.errors import UserError
from library.models.lumina.tiny import build_tiny_lumina, save_tiny_lumina_files
from train_helpers import dataset_toml, make_images, run_script


@pytest.fixture(scope="module")
def lumina(tmp_path_factory):
    root = tmp_path_factory.mktemp("lumina_ft")
    files = save_tiny_lumina_files(root / "model", seed=0)
    files["data"] = dataset_toml(root / "data.toml", make_images(root / "images", count=2), resolution=64)
    return files


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
    full = run_script(_argv(lumina, tmp_path / "a", steps=4, extra=extra), script="lumina_train.py")
    assert full.returncode == 0, full.stderr[-3000:]
    state = tmp_path / "a" / "ft-step00000002-state"
    resumed = run_script(_argv(lumina, tmp_path / "b", steps=4, extra=extra + ["--resume", str(state)]),
                         script="lumina_train.py")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(str(tmp_path / "a" / "ft.safetensors")), load_file(str(tmp_path / "b" / "ft.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_lumina_models", no_loading)
    with pytest.raises(UserError, match=message):
        _main(_argv(lumina, tmp_path / "out", extra=extra))
