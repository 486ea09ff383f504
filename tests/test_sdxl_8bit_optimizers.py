"""8-bit optimizers (bitsandbytes, pinned; its 8-bit optimizers run on the CPU) training tiny SDXL end to end:
sdxl_train_network.py and sdxl_train.py learn with them, the optimizer state really is 8-bit (uint8 moments with
their absmax/qmap), and a run resumed from a saved state gives bit-identical weights."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train_helpers import dreambooth_dir, load_lora

pytest.importorskip("bitsandbytes")

QUANT = "__bnb_optimizer_quant_state__"  # where bitsandbytes keeps a parameter's state in its state_dict


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from library.models.tiny_sdxl import save_tiny_sdxl_single_file

    root = tmp_path_factory.mktemp("sdxl_8bit")
    return {"file": save_tiny_sdxl_single_file(root / "sdxl_tiny.safetensors"),
            "data": dreambooth_dir(root / "train", count=2)}


def _argv(tiny: dict[str, Path], out: Path, optimizer: str, extra: list[str]) -> list[str]:
    return ["--pretrained_model_name_or_path", str(tiny["file"]), "--train_data_dir", str(tiny["data"]),
            "--output_dir", str(out), "--output_name", "m", "--resolution", "64", "--train_batch_size", "2",
            "--max_data_loader_n_workers", "0", "--seed", "1", "--learning_rate", "1e-3", "--max_train_steps", "2",
            "--optimizer_type", optimizer, "--save_state", "--save_every_n_steps", "1", "--noise_offset", "0.05",
            *extra]


def _losses(stderr: str) -> list[float]:
    return [float(v) for v in re.findall(r"loss=([-+0-9.eEnaif]+)\]", stderr)]


def _quant_states(state_folder: Path) -> list[dict[str, torch.Tensor]]:
    """Each parameter's bitsandbytes state in a saved training state (read as training reads it)."""
    state = torch.load(state_folder / "optimizer.pt", weights_only=True)
    return [s[QUANT] for s in state["state"].values()]


def _train_and_resume(script: str, argv_of, capsys) -> tuple[Path, Path, str]:
    """A 2-step run saving a state after each step, then a run resumed from the first state (both in this
    process: the state restores every RNG)."""
    import importlib

    main = importlib.import_module(script.removesuffix(".py")).main
    torch.set_num_threads(1)
    capsys.readouterr()
    main(argv_of("a", []))
    stderr = capsys.readouterr().err
    first = Path(argv_of("a", [])[argv_of("a", []).index("--output_dir") + 1]) / "m-step00000001-state"
    main(argv_of("b", ["--resume", str(first)]))
    assert "steps:  50%" in capsys.readouterr().err  # the progress bar starts at step 1 of 2: it did resume
    return first, first.parent, stderr


def test_lora_trains_with_adamw8bit_and_resumes_bit_exact(tiny, tmp_path, capsys):
    """``min_8bit_size=0`` (an --optimizer_args kwarg of bitsandbytes) quantizes the tiny LoRA's small tensors too;
    at the default (4096 elements) bitsandbytes keeps tensors that small in 32 bits."""
    def argv_of(run: str, extra: list[str]) -> list[str]:
        return _argv(tiny, tmp_path / run, "AdamW8bit", ["--network_dim", "4", "--network_alpha", "2",
                                                         "--optimizer_args", "min_8bit_size=0", *extra])

    first, out, stderr = _train_and_resume("sdxl_train_network.py", argv_of, capsys)
    losses = _losses(stderr)
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses)
    quant = _quant_states(first)
    assert quant and all(q["state1"].dtype == torch.uint8 and q["state2"].dtype == torch.uint8 for q in quant)
    assert all(q["absmax1"].dtype == torch.float32 and q["qmap1"].numel() == 256 for q in quant)
    a, meta = load_lora(out / "m.safetensors")
    b, _ = load_lora(tmp_path / "b" / "m.safetensors")
    # lora_up starts at zero: every module learned, except those of TE1's last layer (SDXL reads its penultimate one)
    ups = [k for k in a if k.endswith("lora_up.weight") and not k.startswith("lora_te1_text_model_encoder_layers_2_")]
    assert len(ups) == 222 and all(a[k].abs().sum() > 0 for k in ups)
    assert meta["ss_optimizer"].startswith("bitsandbytes.optim.adamw.AdamW8bit")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_fine_tuning_trains_with_adamw8bit_and_resumes_bit_exact(tiny, tmp_path, capsys):
    """sdxl_train.py at bitsandbytes' defaults: the large tensors get 8-bit moments, the small ones (norms, biases,
    under 4096 elements) 32-bit ones; the UNet moves and the resumed run ends on the same weights."""
    def argv_of(run: str, extra: list[str]) -> list[str]:
        return _argv(tiny, tmp_path / run, "AdamW8bit", extra)

    first, out, stderr = _train_and_resume("sdxl_train.py", argv_of, capsys)
    assert all(math.isfinite(v) for v in _losses(stderr)) and _losses(stderr)
    quant = _quant_states(first)
    eight = [q for q in quant if q["state1"].dtype == torch.uint8]
    assert eight and all(q["state2"].dtype == torch.uint8 and "absmax1" in q for q in eight)
    assert all(q["state1"].dtype == torch.float32 and q["state1"].numel() < 4096 for q in quant
               if q["state1"].dtype != torch.uint8)
    base, a, b = load_file(str(tiny["file"])), load_file(str(out / "m.safetensors")), \
        load_file(str(tmp_path / "b" / "m.safetensors"))
    unet = [k for k in base if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(base[k], a[k]) for k in unet)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["Lion8bit", "PagedAdamW8bit", "PagedLion8bit", "SGDNesterov8bit"])
def test_every_8bit_name_trains_sdxl_lora(tiny, tmp_path, optimizer):
    """The other bitsandbytes names sd-scripts accepts (the paged ones fall back to plain on the CPU)."""
    import sdxl_train_network

    torch.set_num_threads(1)
    argv = _argv(tiny, tmp_path / "out", optimizer, ["--network_dim", "4", "--optimizer_args", "min_8bit_size=0"])
    argv[argv.index("--max_train_steps") + 1] = "1"
    lora = sdxl_train_network.main(argv)
    tensors, meta = load_lora(lora)
    assert all(torch.isfinite(v).all() for v in tensors.values())
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))
    assert meta["ss_optimizer"].startswith("bitsandbytes.optim.")
    quant = _quant_states(tmp_path / "out" / "m-state")
    assert quant and all(q["state1"].dtype == torch.uint8 for q in quant)
