"""The loop trains whatever a Recipe exposes: a full-weight recipe (DreamBooth-style: UNet + text encoder with
a stop step) runs through the same loop unchanged. The recipe here is test code showing the interface."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from library.io_utils import atomic_save_file
from library.training.recipes import Recipe, SaveInfo
from tests.train_helpers import dataset_toml, make_images, train_args

STOP_TEXT_ENCODER_AT = 1


class FullWeightRecipe(Recipe):
    name = "full"

    def option_problems(self, args: argparse.Namespace) -> list[str]:
        return []

    def trains_text_encoder(self) -> bool:
        return True

    def text_encoder_trains_at(self, global_step: int) -> bool:
        return global_step < STOP_TEXT_ENCODER_AT

    def trained_base_modules(self) -> set[str]:
        return {"unet", "text_encoder"}

    def setup(self, models: Any, args: argparse.Namespace, device: torch.device) -> None:
        self.unet, self.te = models.unet, models.text_encoders[0]
        self.unet.requires_grad_(True)
        self.te.requires_grad_(True)

    def param_groups(self, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
        return [{"params": list(self.te.parameters())}, {"params": list(self.unet.parameters())}], \
            ["textencoder", "unet"]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.te.parameters(), *self.unet.parameters()]

    def train_mode(self, training: bool) -> None:
        self.unet.train(training)
        self.te.train(training)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"unet.{k}": v for k, v in self.unet.state_dict().items()},
                **{f"te.{k}": v for k, v in self.te.state_dict().items()}}

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        self.unet.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("unet.")})
        self.te.load_state_dict({k[3:]: v for k, v in weights.items() if k.startswith("te.")})

    def save(self, path: Path, info: SaveInfo, args: argparse.Namespace) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_save_file(path, lambda tmp: save_file(tensors, tmp, {"step": str(info.global_step)}))


def test_full_weight_recipe_runs_through_the_same_loop(tiny_sd1_dir, tmp_path):
    import train_network
    from library.config.arguments import SUPPORT_TRAIN_DB
    from library.config.run_config import load_run_config
    from library.models.loading import load_sd_models
    from library.training.loop import run_training

    torch.set_num_threads(1)
    data = dataset_toml(tmp_path / "data.toml", make_images(tmp_path / "images", count=2))
    argv = train_args(tiny_sd1_dir, tmp_path / "out", config=data, steps=3,
                      extra=["--save_every_n_steps", "1", "--learning_rate", "1e-4"])
    args = load_run_config(train_network.build_parser(), argv)
    final = run_training(args, FullWeightRecipe(), SUPPORT_TRAIN_DB, tracker_name="db")

    base = load_sd_models(args)
    step1, step2, last = (load_file(str(p)) for p in (tmp_path / "out" / "lora-step00000001.safetensors",
                                                       tmp_path / "out" / "lora-step00000002.safetensors", final))
    te_key = next(k for k in last if k.startswith("te.") and k.endswith("q_proj.weight"))
    unet_key = "unet.conv_in.weight"
    assert not torch.equal(step1[te_key], base.text_encoders[0].state_dict()[te_key[3:]])  # trained at step 1
    assert torch.equal(step1[te_key], last[te_key])  # ... and frozen from step 2 on
    assert not torch.equal(step2[unet_key], last[unet_key])  # the UNet kept training
    assert all(v.dtype == torch.float32 for v in last.values())


def test_network_dropout_reaches_other_network_modules_as_dropout():
    """sd-scripts passes --network_dropout to every --network_module as the 'dropout' network arg (LyCORIS
    reads it there); networks.lora takes it as neuron_dropout only."""
    import train_network
    from library.training.recipes import LoRARecipe

    parser = train_network.build_parser()
    base = ["--pretrained_model_name_or_path", "m", "--network_dropout", "0.1"]
    # any importable module stands in for a third-party network module: only the options are checked here
    other = parser.parse_args(base + ["--network_module", "json", "--network_args", "preset=full"])
    recipe = LoRARecipe(other)
    assert recipe.option_problems(other) == []
    assert recipe.network_kwargs == {"preset": "full", "dropout": 0.1}
    own = parser.parse_args(base)
    recipe = LoRARecipe(own)
    assert recipe.option_problems(own) == []
    assert "dropout" not in recipe.network_kwargs
