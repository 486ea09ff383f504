"""A recipe that is not a diffusion model trains on the same loop: it brings its own model, data loader and
optimizer, and the loop gives it accumulation, logging, validation, saves, the never-overwrite rule and
bit-exact resume. The toy recipe here (a small regression network) is test code showing the interface."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.cli import ArgumentParser
from library.errors import UserError
from library.io_utils import atomic_save_file
from library.training.arguments import add_loop_arguments, loop_option_problems
from library.training.index_loader import IndexEpochLoader
from library.training.outputs import OutputNames, check_output_dir, output_problems
from library.training.recipes import LoopRecipe, SaveInfo


class ToyRecipe(LoopRecipe):
    name = "toy"

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))

    def option_problems(self, args: argparse.Namespace) -> list[str]:
        return []

    def param_groups(self, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
        return [{"params": list(self.model.parameters()), "lr": args.learning_rate}], ["toy"]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def train_mode(self, training: bool) -> None:
        self.model.train(training)

    def batch_loss(self, run: Any, batch: Any, global_step: int) -> torch.Tensor:
        x, y = batch
        noise = torch.randn(x.shape, generator=run.generator) * 0.01  # a random draw that resume must replay
        return torch.nn.functional.mse_loss(self.model(x + noise), y)

    def validation_loss(self, run: Any, global_step: int) -> float | None:
        x, y = run.val_loader
        return float(torch.nn.functional.mse_loss(self.model(x), y))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights)

    def save(self, path: Path, info: SaveInfo, args: argparse.Namespace) -> None:
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        atomic_save_file(path, lambda tmp: save_file(tensors, tmp))


def _data(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])).tanh()
    return list(zip(x, y))


def _collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


def _train(argv: list[str]) -> tuple[Path, ToyRecipe, list[float]]:
    from library.training.loop import train
    from library.training.preparation import assemble_run, make_accelerator

    parser = ArgumentParser(prog="toy")
    add_loop_arguments(parser)
    parser.add_argument("--learning_rate", type=float, default=0.01)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    args = parser.parse_args(argv)
    problems = loop_option_problems(args, cuda=False) + output_problems(args.output_dir, args.output_name or "last")
    if problems:
        raise UserError.from_problems("cannot start", problems)
    names = OutputNames(Path(args.output_dir), args.output_name or "last", "safetensors")
    check_output_dir(names, resume=args.resume, overwrite=args.overwrite)
    accelerator = make_accelerator(args, "toy")
    recipe = ToyRecipe()
    loader = IndexEpochLoader(_data(48, 1), _collate, batch_size=2, seed=args.seed)
    optimizer = torch.optim.AdamW(recipe.trainable_parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    steps_per_epoch = -(-len(loader) // args.gradient_accumulation_steps)
    epochs = args.max_train_epochs or -(-args.max_train_steps // steps_per_epoch)
    steps = args.max_train_epochs * steps_per_epoch if args.max_train_epochs else args.max_train_steps
    run = assemble_run(args, recipe, accelerator, names=names, loader=loader, val_loader=_collate(_data(16, 2)),
                       optimizer=optimizer, lr_scheduler=scheduler, lr_names=["toy"], seed=args.seed,
                       max_train_steps=steps, num_epochs=epochs)
    losses: list[float] = []
    original = recipe.validation_loss

    def recording(run: Any, global_step: int) -> float | None:
        losses.append(original(run, global_step))
        return losses[-1]

    recipe.validation_loss = recording  # type: ignore[method-assign]
    return train(run), recipe, losses


def test_toy_recipe_learns_on_the_loop_and_validates_before_and_during(tmp_path):
    out = tmp_path / "out"
    final, _, losses = _train(["--output_dir", str(out), "--seed", "3", "--max_train_epochs", "8",
                               "--validate_at_first", "--validate_every_n_epochs", "2",
                               "--save_every_n_epochs", "2", "--gradient_accumulation_steps", "2"])
    assert final == out / "last.safetensors" and final.is_file()
    assert sorted(p.name for p in out.glob("last-*.safetensors")) == [
        "last-000002.safetensors", "last-000004.safetensors", "last-000006.safetensors"]
    assert len(losses) == 1 + 4 and losses[-1] < 0.5 * losses[0]
    with pytest.raises(UserError, match="already has files"):
        _train(["--output_dir", str(out), "--seed", "3", "--max_train_steps", "2"])


@pytest.mark.parametrize("accumulation", [1, 3])
def test_toy_recipe_resumes_bit_exact(tmp_path, accumulation):
    common = ["--seed", "5", "--max_train_steps", "9", "--gradient_accumulation_steps", str(accumulation)]
    full, _, _ = _train(["--output_dir", str(tmp_path / "a"), *common])
    _train(["--output_dir", str(tmp_path / "b"), *common, "--save_every_n_steps", "4", "--save_state"])
    state = tmp_path / "b" / "last-step00000004-state"
    assert state.is_dir()
    resumed, _, _ = _train(["--output_dir", str(tmp_path / "b"), *common, "--resume", str(state)])
    a, b = load_file(str(full)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_index_loader_order_depends_only_on_seed_and_epoch_and_shards_evenly():
    samples = list(range(10))
    loaders = [IndexEpochLoader(samples, list, batch_size=2, seed=7, process_index=i, num_processes=3)
               for i in range(3)]
    assert [len(loader) for loader in loaders] == [2, 2, 2]  # 4 samples each (10 padded to 12)
    epoch0 = [sum(loader, []) for loader in loaders]
    seen = sum(epoch0, [])
    assert len(seen) == 12 and set(seen) == set(samples)  # every sample, two repeated to even the shares
    for loader in loaders:
        loader.set_epoch(1)
    epoch1 = [sum(loader, []) for loader in loaders]
    assert epoch1 != epoch0 and len(set(sum(epoch1, []))) == 10
    loaders[0].set_epoch(1, skip_batches=1)
    assert sum(loaders[0], []) == epoch1[0][2:]  # resuming mid-epoch continues with the same batches
    again = IndexEpochLoader(samples, list, batch_size=2, seed=7, process_index=0, num_processes=3)
    assert sum(again, []) == epoch0[0]
