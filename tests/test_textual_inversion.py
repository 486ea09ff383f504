"""train_textual_inversion.py and train_textual_inversion_XTI.py on tiny models: only the new rows train, the
embedding learns, files load in diffusers, --weights and resume continue exactly, XTI keeps one set per block."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.train_helpers import make_images, run_script

TOKEN = "mytok"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ti_data")
    make_images(root / "train" / "2_mytok thing", count=2, caption=f"a photo of {TOKEN}")
    make_images(root / "one" / "1_x", count=1, caption=f"{TOKEN}")
    make_images(root / "plain" / "1_x", count=2, caption="a photo of a thing")
    return {k: root / k for k in ("train", "one", "plain")}


def ti_args(model: Path, out: Path, train: Path, *, steps: int, extra: list[str] | None = None) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(train), "--resolution", "64",
            "--output_dir", str(out), "--token_string", TOKEN, "--init_word", "cat", "--num_vectors_per_token", "2",
            "--learning_rate", "5e-2", "--seed", "1", "--max_train_steps", str(steps),
            "--max_data_loader_n_workers", "0", *(extra or [])]


def prepare(argv: list[str], *, xti: bool = False):
    """A prepared Run of the script (models loaded, nothing trained)."""
    import train_textual_inversion
    import train_textual_inversion_XTI
    from library.training.loop import prepare_training
    from library.training.textual_inversion import (SUPPORT_TEXTUAL_INVERSION, TextualInversionRecipe,
                                                    load_textual_inversion_args, textual_inversion_metadata)

    torch.set_num_threads(1)
    script = train_textual_inversion_XTI if xti else train_textual_inversion
    args = load_textual_inversion_args(script.build_parser(), argv)
    return prepare_training(args, TextualInversionRecipe(args, xti=xti), SUPPORT_TEXTUAL_INVERSION,
                            metadata=textual_inversion_metadata)


def fixed_loss(run, captions: list[str]) -> float:
    """The loss of the first batch at fixed timesteps and noise (comparable before and after training)."""
    from library.training.loop import batch_loss

    run.loader.set_epoch(0)
    batch = dict(next(iter(run.loader)))
    batch["captions"] = captions
    total = 0.0
    with torch.no_grad():
        for t in (100, 300, 500, 700, 900):
            generator = torch.Generator().manual_seed(t)
            total += float(batch_loss(run, batch, 0, timesteps=torch.tensor([t]), generator=generator))
    return total / 5


def test_only_the_new_rows_train_and_the_embedding_learns(tiny_sd1_dir, data, tmp_path):
    from library.training.loop import train

    run = prepare(ti_args(tiny_sd1_dir, tmp_path / "out", data["one"], steps=40))
    te, unet = run.models.text_encoders[0], run.models.unet
    before = {k: v.clone() for k, v in {**te.state_dict(), **{f"unet.{k}": v for k, v in unet.state_dict().items()}}
              .items() if "trained" not in k}
    rows = run.recipe.embeddings[0].trained.detach().clone()
    vocab = run.models.tokenizers[0].get_vocab()
    cat = vocab["cat</w>"]
    assert torch.equal(rows, te.get_input_embeddings().weight[cat].float().repeat(2, 1))  # --init_word cat
    loss_before = fixed_loss(run, [TOKEN])
    assert run.text.text.cache is False  # the text encoder's outputs are never cached for textual inversion

    train(run)

    after = {**te.state_dict(), **{f"unet.{k}": v for k, v in unet.state_dict().items()}}
    assert all(torch.equal(before[k], after[k]) for k in before)  # every original row and weight, bitwise
    assert te.get_input_embeddings().weight.shape[0] == 49408
    assert not torch.equal(rows, run.recipe.embeddings[0].trained.detach())
    loss_after = fixed_loss(run, [TOKEN])
    # a random tiny UNet explains little of the image through its cross-attention: measured 1.0829 -> 1.0791
    assert loss_after < loss_before - 0.002, (loss_before, loss_after)


def test_file_loads_in_diffusers_with_the_same_text_encoder_output(tiny_sd1_dir, data, tmp_path):
    from diffusers import StableDiffusionPipeline
    from library.training.loop import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{TOKEN} on a table --w 64 --h 64 --s 2 --d 1\n", encoding="utf-8")
    run = prepare(ti_args(tiny_sd1_dir, tmp_path / "out", data["train"], steps=2,
                          extra=["--save_model_as", "safetensors", "--save_every_n_steps", "1",
                                 "--sample_prompts", str(prompts), "--sample_every_n_steps", "1"]))
    final = train(run)
    assert final.name == f"{TOKEN}.safetensors"
    assert (tmp_path / "out" / f"{TOKEN}-step00000001.safetensors").is_file()
    assert len(list((tmp_path / "out" / "sample").glob(f"{TOKEN}_*.png"))) == 2  # steps 1 and 2
    prompt = f"a photo of {TOKEN} on a table"
    with torch.no_grad():
        ours = run.text.encode([prompt], torch.device("cpu"))
    from safetensors import safe_open

    with safe_open(str(final), "pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").shape == (2, 32)
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert not any(k.startswith("ss_") for k in meta)

    pt_file = tmp_path / "emb.pt"
    torch.save({"emb_params": run.recipe.file_tensors()["emb_params"]}, pt_file)
    for path in (final, pt_file):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1_dir), safety_checker=None, local_files_only=True)
        pipe.load_textual_inversion(str(path), token=TOKEN)
        text = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            theirs = pipe.text_encoder(ids)[0]
        assert torch.allclose(ours, theirs, atol=1e-6), (ours - theirs).abs().max()


def test_weights_continue_exactly_including_a1111_files(tiny_sd1_dir, data, tmp_path):
    from library.training.loop import train

    run = prepare(ti_args(tiny_sd1_dir, tmp_path / "a", data["train"], steps=2,
                          extra=["--save_model_as", "pt"]))
    final = train(run)
    saved = torch.load(final, weights_only=True)["emb_params"]
    assert torch.equal(saved, run.recipe.embeddings[0].trained.detach())

    a1111 = tmp_path / "a1111.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": saved * 2}, "name": "x", "step": 9}, a1111)
    for path, expected in ((final, saved), (a1111, saved * 2)):
        cont = prepare(ti_args(tiny_sd1_dir, tmp_path / f"b{path.stem}", data["train"], steps=2,
                               extra=["--weights", str(path)]))
        assert torch.equal(cont.recipe.embeddings[0].trained.detach(), expected)


def test_resume_is_bit_exact(tiny_sd1_dir, data, tmp_path):
    extra = ["--save_state", "--save_every_n_steps", "2", "--save_model_as", "safetensors", "--cache_latents",
             "--lr_scheduler", "cosine", "--noise_offset", "0.05", "--optimizer_type", "AdamW"]
    full = run_script(ti_args(tiny_sd1_dir, tmp_path / "a", data["train"], steps=4, extra=extra),
                      script="train_textual_inversion.py")
    assert full.returncode == 0, full.stderr[-3000:]
    state = tmp_path / "a" / f"{TOKEN}-step00000002-state"
    assert json.loads((state / "train_state.json").read_text())["global_step"] == 2
    resumed = run_script(ti_args(tiny_sd1_dir, tmp_path / "b", data["train"], steps=4,
                                 extra=extra + ["--resume", str(state)]), script="train_textual_inversion.py")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / f"{TOKEN}.safetensors"))["emb_params"] for d in ("a", "b"))
    step2 = load_file(str(tmp_path / "a" / f"{TOKEN}-step00000002.safetensors"))["emb_params"]
    assert torch.equal(a, b) and not torch.equal(a, step2)


def test_xti_saves_one_set_per_block(tiny_sd1_dir, data, tmp_path):
    from safetensors.torch import load_file

    from library.models.embeddings import cross_attention_blocks
    from library.training.loop import train

    run = prepare(ti_args(tiny_sd1_dir, tmp_path / "out", data["train"], steps=2,
                          extra=["--save_model_as", "safetensors"]), xti=True)
    names = [n for n, _ in cross_attention_blocks(run.models.unet)]
    assert names == ["IN01", "IN03", "IN05", "MID", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07"]
    start = run.recipe.embeddings[0].trained.detach().clone()
    final = train(run)
    saved = load_file(str(final))
    assert list(saved) == names and all(v.shape == (2, 32) for v in saved.values())
    moved = [not torch.equal(saved[n], start[i * 2:(i + 1) * 2]) for i, n in enumerate(names)]
    assert all(moved)  # every block's set got its own gradient
    assert not torch.equal(saved["IN01"], saved["OUT07"])

    cont = prepare(ti_args(tiny_sd1_dir, tmp_path / "b", data["train"], steps=1,
                           extra=["--weights", str(final)]), xti=True)
    assert torch.equal(cont.recipe.embeddings[0].trained.detach(), torch.cat([saved[n] for n in names]))


def test_templates_replace_captions_and_the_plan_names_captions_without_the_token(tiny_sd1_dir, data, tmp_path,
                                                                                  capsys):
    from library.training.textual_inversion import OBJECT_TEMPLATES

    run = prepare(ti_args(tiny_sd1_dir, tmp_path / "a", data["plain"], steps=1))
    assert "2 of 2 images have captions without the token string 'mytok'" in capsys.readouterr().out
    run.loader.set_epoch(0)
    assert sorted(c for b in run.loader for c in b["captions"]) == ["a photo of a thing 0", "a photo of a thing 1"]

    run = prepare(ti_args(tiny_sd1_dir, tmp_path / "b", data["plain"], steps=1, extra=["--use_object_template"]))
    out = capsys.readouterr().out
    assert "without the token" not in out and "captions replaced by 27 templates" in out
    run.loader.set_epoch(0)
    captions = [c for b in run.loader for c in b["captions"]]
    assert captions and all(c in {t.format(TOKEN) for t in OBJECT_TEMPLATES} for c in captions)


@pytest.mark.parametrize("extra, message", [
    (["--token_string", "cat"], "'cat' already in the tokenizer's vocabulary"),
    (["--cache_text_encoder_outputs"], "cannot be used for textual inversion"),
    (["--use_object_template", "--use_style_template"], "exclude each other"),
    (["--num_vectors_per_token", "0"], "--num_vectors_per_token must be >= 1"),
    (["--init_word", " "], "gives no tokens"),
])
def test_refused_options(tiny_sd1_dir, data, tmp_path, extra, message):
    from library.errors import UserError

    with pytest.raises(UserError, match=message):
        prepare(ti_args(tiny_sd1_dir, tmp_path / "out", data["train"], steps=1, extra=extra))
    assert not (tmp_path / "out").exists()


def test_token_in_vocabulary_is_found_before_the_model_loads(tiny_sd1_dir, data, tmp_path):
    """Only the tokenizer is read: a model folder without weights (configs only) still gives the vocabulary
    error, not a loading error."""
    import shutil

    from library.errors import UserError

    model = tmp_path / "model"
    shutil.copytree(tiny_sd1_dir / "tokenizer", model / "tokenizer")
    shutil.copy(tiny_sd1_dir / "model_index.json", model)
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        (model / part).mkdir()
        for config in (tiny_sd1_dir / part).glob("*.json"):
            shutil.copy(config, model / part)
    with pytest.raises(UserError, match="'hello' already in"):
        prepare(ti_args(model, tmp_path / "out", data["train"], steps=1, extra=["--token_string", "hello"]))


def test_weights_with_another_vector_count_are_refused(tiny_sd1_dir, data, tmp_path):
    from library.errors import UserError

    path = tmp_path / "three.pt"
    torch.save({"emb_params": torch.zeros(3, 32)}, path)
    with pytest.raises(UserError, match="holds 3 vector.*use --num_vectors_per_token 3"):
        prepare(ti_args(tiny_sd1_dir, tmp_path / "out", data["train"], steps=1, extra=["--weights", str(path)]))
    nan = tmp_path / "nan.safetensors"
    from safetensors.torch import save_file

    save_file({"emb_params": torch.full((2, 32), float("nan"))}, str(nan))
    with pytest.raises(UserError, match="finite"):
        prepare(ti_args(tiny_sd1_dir, tmp_path / "out", data["train"], steps=1, extra=["--weights", str(nan)]))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot read it as an embedding file"):
        prepare(ti_args(tiny_sd1_dir, tmp_path / "out", data["train"], steps=1, extra=["--weights", str(bad)]))


def test_dataset_config_and_metadata_styles(tiny_sd1_dir, data, tmp_path):
    from tests.train_helpers import dataset_toml

    images = data["train"] / "2_mytok thing"
    config = dataset_toml(tmp_path / "data.toml", images, batch_size=2, extra_subset="caption_extension = '.caption'")
    argv = ti_args(tiny_sd1_dir, tmp_path / "a", data["train"], steps=1)
    at = argv.index("--train_data_dir")
    run = prepare(argv[:at] + ["--dataset_config", str(config)] + argv[at + 2:])
    run.loader.set_epoch(0)
    assert sorted(c for b in run.loader for c in b["captions"]) == [f"a photo of {TOKEN} {i}" for i in (0, 1)]

    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({f"img{i}": {"caption": f"{TOKEN} in metadata {i}"} for i in (0, 1)}), "utf-8")
    run = prepare(ti_args(tiny_sd1_dir, tmp_path / "b", images, steps=1, extra=["--in_json", str(meta)]))
    run.loader.set_epoch(0)
    assert sorted(c for b in run.loader for c in b["captions"]) == [f"{TOKEN} in metadata {i}" for i in (0, 1)]


def test_two_processes_train_xti(tiny_sd1_dir, data, tmp_path):
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{TOKEN} --w 64 --h 64 --s 2 --d 1\na {TOKEN} --w 64 --h 64 --s 2 --d 2\n", encoding="utf-8")
    proc = run_script(ti_args(tiny_sd1_dir, tmp_path / "a", data["train"], steps=2,
                              extra=["--save_model_as", "safetensors", "--save_state_on_train_end",
                                     "--sample_prompts", str(prompts), "--sample_every_n_steps", "2"]),
                      processes=2, script="train_textual_inversion_XTI.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_file(str(tmp_path / "a" / f"{TOKEN}.safetensors"))
    assert len(saved) == 10 and not torch.equal(saved["IN01"], saved["OUT07"])
    assert len(list((tmp_path / "a" / "sample").glob("*.png"))) == 2  # one prompt per process
    assert (tmp_path / "a" / f"{TOKEN}-state" / "rng_1.pt").is_file()


def test_pooled_output_stays_at_the_eos_with_a_legacy_config():
    """SDXL's encoder configs have eos_token_id 2, for which transformers pools at the largest id: a new
    token. After pool_at_first_eos the pooled state is the EOS's, as for captions without new tokens."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from library.models.embeddings import install_trained_embedding, pool_at_first_eos
    from library.models.tiny import TinyConfig

    config = CLIPTextConfig(**{**TinyConfig().text_config(), "eos_token_id": 2})
    torch.manual_seed(0)
    te = CLIPTextModelWithProjection(config).eval()
    install_trained_embedding(te, torch.randn(1, 32))
    ids = torch.tensor([[49406, 320, 49408, 49407, 49407]])  # <BOS> a <new> <EOS> <pad>
    with torch.no_grad():
        before = te(ids, output_hidden_states=True)
        pool_at_first_eos(te, 49407)
        after = te(ids, output_hidden_states=True)
        at_eos = te.text_projection(before.last_hidden_state[:, 3])
    assert not torch.allclose(before.text_embeds, at_eos)
    assert torch.equal(after.text_embeds, at_eos)
