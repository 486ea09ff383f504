"""sdxl_train_textual_inversion.py on a tiny SDXL: both encoders get the token, both embeddings train and are
saved as clip_l / clip_g, nothing else changes, and --weights reads the file back into both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.train_helpers import make_images

TOKEN = "mytok"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from library.models.tiny_sdxl import save_tiny_sdxl_diffusers_model

    root = tmp_path_factory.mktemp("sdxl_ti")
    make_images(root / "train" / "2_x", count=2, caption=f"a photo of {TOKEN}")
    return {"model": save_tiny_sdxl_diffusers_model(root / "model"), "data": root / "train"}


def sdxl_ti_args(tiny: dict[str, Path], out: Path, *, steps: int, extra: list[str] | None = None) -> list[str]:
    return ["--pretrained_model_name_or_path", str(tiny["model"]), "--train_data_dir", str(tiny["data"]),
            "--resolution", "64", "--output_dir", str(out), "--token_string", TOKEN, "--init_word", "cat",
            "--num_vectors_per_token", "2", "--learning_rate", "5e-2", "--seed", "1", "--max_train_steps", str(steps),
            "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors", *(extra or [])]


def prepare(argv: list[str]):
    import sdxl_train_textual_inversion as script
    from library.training.loop import prepare_training
    from library.training.textual_inversion import (SUPPORT_SDXL_TEXTUAL_INVERSION, TextualInversionRecipe,
                                                    load_textual_inversion_args, textual_inversion_metadata)

    torch.set_num_threads(1)
    args = load_textual_inversion_args(script.build_parser(), argv)
    return prepare_training(args, TextualInversionRecipe(args), SUPPORT_SDXL_TEXTUAL_INVERSION,
                            metadata=textual_inversion_metadata, families=("sdxl",))


def test_both_encoders_train_and_save_clip_l_and_clip_g(tiny, tmp_path):
    from safetensors import safe_open

    from library.training.loop import train

    run = prepare(sdxl_ti_args(tiny, tmp_path / "a", steps=2))
    encoders = run.models.text_encoders
    assert len(encoders) == 2 and len(run.recipe.embeddings) == 2
    before = [{k: v.clone() for k, v in te.state_dict().items() if "trained" not in k} for te in encoders]
    unet = {k: v.clone() for k, v in run.models.unet.state_dict().items()}
    start = [e.trained.detach().clone() for e in run.recipe.embeddings]
    final = train(run)

    for te, old in zip(encoders, before):
        assert all(torch.equal(te.state_dict()[k], v) for k, v in old.items())
    assert all(torch.equal(run.models.unet.state_dict()[k], v) for k, v in unet.items())
    with safe_open(str(final), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert sorted(saved) == ["clip_g", "clip_l"]
    assert saved["clip_l"].shape == (2, 32) and saved["clip_g"].shape == (2, 48)
    assert not torch.equal(saved["clip_l"], start[0]) and not torch.equal(saved["clip_g"], start[1])
    assert meta["modelspec.architecture"].endswith("/textual-inversion")

    cont = prepare(sdxl_ti_args(tiny, tmp_path / "b", steps=1, extra=["--weights", str(final)]))
    assert torch.equal(cont.recipe.embeddings[0].trained.detach(), saved["clip_l"])
    assert torch.equal(cont.recipe.embeddings[1].trained.detach(), saved["clip_g"])


def test_an_sd1_embedding_is_refused(tiny, tmp_path):
    from safetensors.torch import save_file

    from library.errors import UserError

    path = tmp_path / "sd1.safetensors"
    save_file({"emb_params": torch.zeros(2, 32)}, str(path))
    with pytest.raises(UserError, match="no 'clip_l' embedding"):
        prepare(sdxl_ti_args(tiny, tmp_path / "out", steps=1, extra=["--weights", str(path)]))


def test_script_runs_as_a_file_and_samples_with_the_token(tiny, tmp_path):
    import os
    import subprocess
    import sys

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{TOKEN} on a table --w 64 --h 64 --s 2 --d 1\n", encoding="utf-8")
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(repo / "sdxl_train_textual_inversion.py"),
                           *sdxl_ti_args(tiny, out, steps=2, extra=["--sample_prompts", str(prompts),
                                                                    "--sample_every_n_steps", "2"])],
                          capture_output=True, text=True, cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / f"{TOKEN}.safetensors").is_file()
    assert len(list((out / "sample").glob(f"{TOKEN}_*.png"))) == 1
