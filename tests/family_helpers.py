"""Helpers shared by the per-family tests (FLUX.1, SD3, Lumina; SD and SDXL for the LoRA tools): the tiny model's
files with a dataset, a family's LoRA script run in this process or in subprocesses, and the checks each family's
tests make the same way (a finite loss and gradient per flow-matching setting, bit-exact resume, two processes,
post-hoc EMA, --fp8_base against bf16, refusals before any model loads, block swap against the plain model)."""

from __future__ import annotations

import copy
import functools
import importlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from train_helpers import ROOT, dataset_toml, load_lora, make_images, prepare_run, run_main, run_script

Weights = dict[str, torch.Tensor]
ArgvFor = Callable[[Path, list[str]], list[str]]  # (output folder, extra options) -> command line

# refusal cases every flow-matching LoRA script shares: the options appended to a good command line
SHARED_REFUSALS: dict[str, tuple[str, ...]] = {
    "offload": ("--cpu_offload_checkpointing",),
    "swap": ("--blocks_to_swap", "8"),
    "swap_limit": ("--blocks_to_swap", "8", "--gradient_checkpointing"),
    "sd_flags": ("--clip_skip", "2"),
    "flow": ("--min_snr_gamma", "5"),
    "network": ("--network_module", "networks.lora"),
}


def with_dataset(root: Path, files: dict[str, Path]) -> dict[str, Path]:
    """``files`` of a tiny model saved under ``root``, plus ``data``: a two-image dataset config at 64 px."""
    files["data"] = dataset_toml(root / "data.toml", make_images(root / "images", count=2), resolution=64)
    return files


def two_process_dataset(root: Path) -> Path:
    """Four images at batch size 1: two batches for each of two processes."""
    return dataset_toml(root / "d.toml", make_images(root / "img", count=4), resolution=64, batch_size=1)


@dataclass(frozen=True)
class LoRAScript:
    """A family's LoRA training script: its module name, its recipe (``module:Class``) and the family it trains."""

    script: str
    recipe: str
    family: str

    def main(self, argv: list[str]) -> Path | None:
        """``<script>.main(argv)`` in this process."""
        return run_main(argv, script=self.script)

    def prepare(self, argv: list[str]) -> Any:
        """The prepared run (models loaded, nothing trained yet)."""
        module, name = self.recipe.split(":")
        recipe = getattr(importlib.import_module(module), name)
        return prepare_run(argv, script=self.script, recipe=recipe, families=(self.family,))

    @property
    def file(self) -> str:
        return f"{self.script}.py"


def trained(weights: Weights) -> bool:
    """Some LoRA up-projection (zero at the start) has moved."""
    return any(weights[k].abs().sum() > 0 for k in weights if k.endswith("lora_up.weight"))


def forbid_loading(monkeypatch: pytest.MonkeyPatch, module: Any, loader: str) -> None:
    """Make ``module.loader`` fail the test if anything calls it (a refusal must come before any model loads)."""
    monkeypatch.setattr(module, loader, lambda *a, **k: pytest.fail("a model was loaded"))


def refusal_argv(argv: list[str], case: str, edits: dict[str, Callable[[list[str]], list[str]]]) -> list[str]:
    """``argv`` edited for a refusal ``case``: the family's own edit in ``edits``, ``no_ae`` (``--ae`` and its value
    left out) or one of ``SHARED_REFUSALS``."""
    if case in edits:
        return edits[case](argv)
    if case == "no_ae":
        return argv[: argv.index("--ae")] + argv[argv.index("--ae") + 2:]
    return argv + list(SHARED_REFUSALS[case])


def assert_finite_loss_and_gradient(run: Any, batch: Any, settings: Any, label: Any) -> None:
    """One backward pass of ``batch`` under flow-matching ``settings``: a finite loss, and the network gets a
    nonzero gradient."""
    from library.training.loop import batch_loss

    run.flow_settings = settings
    run.recipe.network.zero_grad(set_to_none=True)
    loss = batch_loss(run, batch, 0)
    loss.backward()
    grads = [p.grad for p in run.recipe.network.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and any(g.abs().sum() > 0 for g in grads), label


def assert_resume_is_bit_exact(script: str, argv: ArgvFor, root: Path, extra: list[str], *, name: str = "lora",
                               files: Iterable[str] = ()) -> dict[str, Weights]:
    """A 4-step run saving its state at step 2 (``extra`` asks for that), and a run resumed from that state, both
    ``python script`` subprocesses (MKL_CBWR is set before torch loads), end with the same tensors in ``files``
    (default ``<name>.safetensors``); returns the first run's weights of each file."""
    full = run_script(argv(root / "a", extra), script=script)
    assert full.returncode == 0, full.stderr[-3000:]
    state = root / "a" / f"{name}-step00000002-state"
    assert json.loads((state / "train_state.json").read_text())["global_step"] == 2
    resumed = run_script(argv(root / "b", [*extra, "--resume", str(state)]), script=script)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    weights = {}
    for file in files or (f"{name}.safetensors",):
        a, _ = load_lora(root / "a" / file)
        b, _ = load_lora(root / "b" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
        weights[file] = a
    return weights


def run_two_processes(argv: list[str], script: str, out: Path) -> tuple[Weights, dict[str, str]]:
    """``script`` under ``accelerate launch --multi_gpu --num_processes 2`` on the four-image dataset: each process
    trains two batches; returns the LoRA saved in ``out`` and its metadata."""
    result = run_script(argv, processes=2, script=script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 per process with 2 process(es)" in result.stdout  # 4 images, batch 1: each process 2 batches
    return load_lora(out / "lora.safetensors")


def post_hoc_ema(out: Path, dest: Path) -> dict[str, str]:
    """``lora_post_hoc_ema.py`` over the step files in ``out`` into ``dest``: it must hold the modules of the last
    LoRA; returns its metadata."""
    files = sorted(str(p) for p in out.glob("lora-step*.safetensors"))
    result = subprocess.run([sys.executable, str(ROOT / "lora_post_hoc_ema.py"), *files, "--output_file", str(dest)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    ema, meta = load_lora(dest)
    last, _ = load_lora(out / "lora.safetensors")
    assert ema.keys() == last.keys()
    return meta


def assert_fp8_lora_close(plain: Weights, fp8: Weights, meta: dict[str, str]) -> None:
    """The --fp8_base LoRA trained (every up-projection moved) and points the way of the bf16 run's: float8
    storage changes the result a little, not its direction."""
    assert meta["ss_fp8_base"] == "True" and plain.keys() == fp8.keys()
    ups = [k for k in plain if k.endswith("lora_up.weight")]
    assert all(fp8[k].abs().sum() > 0 for k in ups)
    a = torch.cat([plain[k].float().flatten() for k in ups])
    b = torch.cat([fp8[k].float().flatten() for k in ups])
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    assert not torch.equal(a, b) and cosine > 0.9


# ------------------------------------------------------------------------------ latents made ahead of training

LATENT_BUCKETS = ("--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16")


def captioned_folder(root: Path) -> tuple[Path, Path, Path]:
    """Two images and a metadata JSON with their captions: (the image folder, that JSON, the JSON
    prepare_buckets_latents.py is to write)."""
    folder = make_images(root / "train", count=2)
    in_json, out_json = root / "meta.json", root / "meta_lat.json"
    in_json.write_text(json.dumps({f"img{i}": {"caption": f"sks {i}"} for i in range(2)}), encoding="utf-8")
    return folder, in_json, out_json


def prepare_latents_refuses(base: list[str], cases: Iterable[tuple[Path, list[str], str]]) -> None:
    """prepare_buckets_latents.py on ``base`` (folder, JSON in, JSON out) refuses each (model, options, message)."""
    from library.errors import UserError
    from library.tools.prepare_latents import main as prepare

    for model, extra, message in cases:
        with pytest.raises(UserError, match=message):
            prepare([*base, str(model), *extra, "--max_resolution", "64,64", *LATENT_BUCKETS])


def in_json_argv(argv: list[str], folder: Path, out_json: Path) -> list[str]:
    """A fine-tuning command line that reads ``out_json`` and the images in ``folder`` instead of its
    --dataset_config."""
    i = argv.index("--dataset_config")
    return argv[:i] + argv[i + 2:] + ["--in_json", str(out_json), "--train_data_dir", str(folder), "--resolution",
                                      "64", "--enable_bucket", *LATENT_BUCKETS, "--train_batch_size", "2"]


# ------------------------------------------------------------------------------ memory options on tiny models

Forward = Callable[..., torch.Tensor]  # forward(model, grad=True) -> the denoiser's output on fixed inputs


def random_lora(model: torch.nn.Module, module: str) -> torch.nn.Module:
    """A LoRA of ``module`` (``networks.lora_flux`` ...) applied to ``model`` with random weights (rank 4)."""
    network = importlib.import_module(module).create_network(1.0, 4, 4, None, [], model)
    network.apply_to([], model, False, True)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.05)
    return network


def loss_and_grads(forward: Forward, model: torch.nn.Module, params: list[torch.Tensor],
                   grad: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The mean squared output and the gradients of ``params`` (cleared afterwards); no gradients with ``grad``
    False (sampling / validation)."""
    loss = forward(model, grad).square().mean()
    if not grad:
        return loss, []
    loss.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return loss.detach(), grads


def assert_swap_repeats_the_plain_step(forward: Forward, model: torch.nn.Module, params: list[torch.Tensor],
                                       swap: Any, plain: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    """With the block swap on, two steps give the ``plain`` loss and gradients bit for bit (the state one step
    leaves is right for the next), then a pass without gradients; no block stays resident after each."""
    plain_loss, plain_grads = plain
    for _ in range(2):
        loss, grads = loss_and_grads(forward, model, params)
        assert torch.equal(loss, plain_loss)
        assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
        swap.release_all()
        assert not swap.resident
    assert torch.equal(loss_and_grads(forward, model, params, grad=False)[0], plain_loss)  # sampling / validation
    assert not swap.resident


def _sgd_step(p: torch.Tensor, lr: float) -> None:
    with torch.no_grad():
        p.add_(p.grad, alpha=-lr)
    p.grad = None


def _fused_sgd_losses(model: torch.nn.Module, forward: Forward, lr: float,
                      swap: Callable[[torch.nn.Module], Any] | None) -> list[float]:
    """Three steps with SGD applied to each parameter inside backward (as the fused optimizers do), under the
    block swap ``swap(model)`` makes if given; the swapped blocks' host copies (the updated weights) are put back."""
    model.enable_gradient_checkpointing()
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(functools.partial(_sgd_step, lr=lr))
    block_swap = swap(model) if swap is not None else None
    losses = []
    for _ in range(3):
        loss = forward(model).square().mean()
        loss.backward()
        losses.append(float(loss.detach()))
    if block_swap is not None:
        block_swap.release_all()
        for i in block_swap.swapped:
            for t, host, _ in block_swap.host[i]:
                t.data = host
    return losses


def assert_block_swap_keeps_the_fused_updates(model: torch.nn.Module, forward: Forward, lr: float,
                                              swap: Callable[[torch.nn.Module], Any]) -> None:
    """Full fine-tuning with swapped blocks: each block updated inside backward while on the device, the update
    reaching the host copy: the same losses (falling) and the same weights as without the swap."""
    swapped_model = copy.deepcopy(model)
    plain = _fused_sgd_losses(model, forward, lr, None)
    swapped = _fused_sgd_losses(swapped_model, forward, lr, swap)
    assert plain == swapped and plain[2] < plain[0]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), swapped_model.parameters()))


# ------------------------------------------------------------------------------ LoRA tools on full-size models


def full_size_lora(targets: dict[str, tuple[int, ...]], path: Path, *, rename: Callable[[str], str] = lambda n: n,
                   keep: Callable[[str], bool] = lambda n: True, metadata: dict[str, str] | None = None) -> Weights:
    """A rank-1 float16 LoRA over every target (name -> weight shape) that ``keep`` keeps, saved at ``path``."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    sd = {}
    for name, shape in targets.items():
        if not keep(name):
            continue
        down = torch.randn(1, *shape[1:], generator=gen) * 0.01
        up = torch.randn(shape[0], 1, *([1, 1] if len(shape) == 4 else []), generator=gen) * 0.01
        name = rename(name)
        sd.update({f"{name}.lora_down.weight": down.half(), f"{name}.lora_up.weight": up.half(),
                   f"{name}.alpha": torch.tensor(1.0).half()})
    save_file(sd, str(path), metadata)
    return sd


def check_report(capsys: pytest.CaptureFixture, argv: list[str], says: Iterable[str]) -> str:
    """``check_lora_weights.main(argv)``'s report, which must contain every line of ``says``."""
    from networks import check_lora_weights

    capsys.readouterr()
    check_lora_weights.main(argv)
    out = capsys.readouterr().out
    missing = [line for line in says if line not in out]
    assert not missing, (missing, out)
    return out


def merge_and_extract(model: Path, lora: Path, root: Path, *options: str) -> Any:
    """``lora`` merged into ``model`` (merge_lora.py) and extracted again against ``model``
    (extract_lora_from_models.py with ``options``); returns the extracted LoRA as ``read_lora`` reads it."""
    from library.lora_tools.lora_file import read_lora
    from networks import extract_lora_from_models, merge_lora

    tuned, out = root / f"tuned_{lora.stem}.safetensors", root / f"extracted_{lora.stem}.safetensors"
    merge_lora.main(["--sd_model", str(model), "--save_to", str(tuned), "--models", str(lora)])
    extract_lora_from_models.main(["--model_org", str(model), "--model_tuned", str(tuned), "--save_to", str(out),
                                   *options])
    return read_lora(out)


def assert_extracted(known: Path, extracted: Any) -> None:
    """``extracted`` holds every module of the LoRA file ``known`` with its weight change, any other with none."""
    from library.lora_tools.lora_file import read_lora

    source = read_lora(known)
    assert set(source.modules) <= set(extracted.modules)
    for name, m in extracted.modules.items():
        expected = source.modules[name].delta() if name in source.modules else torch.zeros(m.weight_shape)
        assert torch.allclose(m.delta(), expected, atol=2e-6), name
