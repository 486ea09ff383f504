"""Recipes: what differs between training runs, behind one small interface.

The loop (``library.training.loop``) trains whatever parameters a recipe exposes. :class:`LoopRecipe` is
what the loop itself needs from any recipe: the trained parameters and their optimizer groups, the loss of
one batch, the held-out loss, samples, what a resumable state holds and how the trained weights are written.
A recipe for another kind of model (a captioner, a VLM) implements just that and brings its own model, data
loader and optimizer (``docs/architecture.md``, "A recipe that is not a diffusion model").

:class:`Recipe` is the recipe of the diffusion models: its loss, validation and samples are the loop's
diffusion ones, and it adds which modules train (a LoRA network, or the UNet and optionally the text
encoder), whether the text encoder gets gradients at a given step, and per-batch settings. LoRA training,
DreamBooth and fine-tuning differ only there, without changes to the loop.
"""

from __future__ import annotations

import argparse
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError


@dataclass
class SaveInfo:
    """What a recipe needs to write a file: ``metadata`` (already built for the run), and where in the run."""

    global_step: int
    epoch: int
    metadata: dict[str, str] = field(default_factory=dict)


class LoopRecipe(ABC):
    """What the loop needs from any recipe (see the module docstring)."""

    name: str = ""
    file_extension: str = "safetensors"

    @abstractmethod
    def option_problems(self, args: argparse.Namespace) -> list[str]:
        """Problems with the recipe's options (checked before any model loads)."""

    @abstractmethod
    def param_groups(self, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
        """Optimizer parameter groups and a log name for each (``unet``, ``textencoder``, ``group<i>``)."""

    @abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter the optimizer updates."""

    @abstractmethod
    def train_mode(self, training: bool) -> None:
        """Switch the trained modules between training and evaluation (sampling, validation)."""

    @abstractmethod
    def batch_loss(self, run: Any, batch: Any, global_step: int) -> torch.Tensor:
        """The scalar loss of one micro-batch of ``run.loader``, with its graph. Random draws must come from
        ``run.generator`` or the global RNGs (a resumable state holds both)."""

    @abstractmethod
    def validation_loss(self, run: Any, global_step: int) -> float | None:
        """The held-out loss (the same value on every process), or None without held-out data. The loop
        calls it in eval mode and restores every RNG stream afterwards."""

    def sample(self, run: Any, global_step: int, epoch: int | None) -> None:
        """Write samples (images, captions) of the current weights; ``epoch`` is set at the end of an epoch.
        Called on every process, in eval mode; the loop restores every RNG stream afterwards."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights for a resumable state."""

    @abstractmethod
    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (strict)."""

    @abstractmethod
    def save(self, path: Path, info: SaveInfo, args: argparse.Namespace) -> None:
        """Write the trained weights (atomically) to ``path``."""

    def on_epoch_start(self, epoch: int) -> None:
        """Per-epoch hook (e.g. a network's dropout schedule)."""

    def after_optimizer_step(self, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
        """Work after each optimizer step (e.g. max-norm regularization); returns values to log."""
        return {}


class Recipe(LoopRecipe):
    """The part of a diffusion-model run that depends on what is trained."""

    # whether the frozen text encoders and VAE are used after their outputs are cached (a recipe that saves
    # the whole model does); when not, and no samples are made, the run frees them after caching
    needs_frozen_models = True

    @abstractmethod
    def trains_text_encoder(self) -> bool:
        """Whether the text encoder gets gradients at any step of the run (decided from the options)."""

    def trained_base_modules(self) -> set[str]:
        """Base modules whose own weights train (``unet``, ``text_encoder``): kept in float32 while the
        frozen ones are cast to the mixed-precision dtype. A LoRA recipe trains none of them."""
        return set()

    def family_problems(self, family: Any) -> list[str]:
        """Problems of the options with the model family (a ``ModelFamily``), found before any model loads."""
        return []

    def dataset_problems(self, params: Any) -> list[str]:
        """Problems of the options with the dataset configuration (a ``DatasetGroupParams``), found before any
        model loads."""
        return []

    def text_encoder_trains_at(self, global_step: int) -> bool:
        """Whether the text encoder gets gradients at this step (DreamBooth may stop training it)."""
        return self.trains_text_encoder()

    @abstractmethod
    def setup(self, models: Any, args: argparse.Namespace, device: torch.device) -> None:
        """Create/select the trained modules on ``models`` (an ``SDModels``) and set ``requires_grad``."""

    def prepare_dataset(self, group: Any) -> None:
        """Adjust the dataset group before its plan is printed (caption templates, notes for the plan)."""

    def before_forward(self, batch: dict[str, Any]) -> None:
        """Per-batch settings (e.g. the dataset's network multiplier)."""

    def cast_trained(self, dtype: torch.dtype) -> None:
        """Cast the trained weights (``--full_fp16`` / ``--full_bf16``)."""

    def metadata(self, args: argparse.Namespace) -> dict[str, str]:
        """Recipe-specific metadata entries for saved files."""
        return {}

    def text_conditioning(self, text: Any) -> Any:
        """The text conditioning the loop calls as ``text(captions, device)`` (default: the loop's own)."""
        return text

    def batch_loss(self, run: Any, batch: Any, global_step: int) -> torch.Tensor:
        from library.training.loop import batch_loss

        return batch_loss(run, batch, global_step)

    def validation_loss(self, run: Any, global_step: int) -> float | None:
        from library.training.loop import diffusion_validation_loss

        return diffusion_validation_loss(run, global_step)

    def sample(self, run: Any, global_step: int, epoch: int | None) -> None:
        from library.training.loop import sample_images

        sample_images(run, global_step, epoch)


def _save_dtype(precision: str | None, fallback: torch.dtype) -> torch.dtype:
    from library.precision import dtype_of

    return dtype_of(precision, fallback)


class LoRARecipe(Recipe):
    """A kohya-style network module (``--network_module``, default ``networks.lora``) trained on top of the
    frozen UNet and text encoder."""

    name = "lora"
    needs_frozen_models = False  # saves only the network

    def __init__(self, args: argparse.Namespace):
        self.train_unet = not getattr(args, "network_train_text_encoder_only", False)
        self.train_te = not getattr(args, "network_train_unet_only", False)
        self.file_extension = {"ckpt": "ckpt", "pt": "pt"}.get(getattr(args, "save_model_as", None), "safetensors")
        self.network: Any = None
        self.module_name = args.network_module or "networks.lora"
        self.network_kwargs: dict[str, Any] = {}

    def option_problems(self, args: argparse.Namespace) -> list[str]:
        from library.training.network_args import network_option_problems, parse_network_args

        problems = network_option_problems(args)
        if self.train_te and (args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk):
            problems.append("--cache_text_encoder_outputs needs a frozen text encoder: add --network_train_unet_only "
                            "(or remove the caching option)")
        try:
            importlib.import_module(self.module_name)
        except ImportError as err:
            problems.append(f"--network_module {self.module_name}: cannot import it ({err})")
        if not problems:
            self.network_kwargs = parse_network_args(args.network_args, self.module_name)
            if self.module_name != "networks.lora" and args.network_dropout is not None:
                # modules such as lycoris.kohya read the neuron dropout from the network args, as with sd-scripts
                self.network_kwargs.setdefault("dropout", args.network_dropout)
        return problems

    def trains_text_encoder(self) -> bool:
        return self.train_te

    def family_problems(self, family: Any) -> list[str]:
        """Block-wise network args counted in the family's block layout (SDXL: 23 slots, SD1/2: 25)."""
        if self.module_name != "networks.lora":
            return []
        from networks.lora_options import parse_network_kwargs

        try:
            parse_network_kwargs(self.network_kwargs, layout=family.lora_blocks)
        except UserError as err:
            return err.items()
        return []

    def setup(self, models: Any, args: argparse.Namespace, device: torch.device) -> None:
        module = importlib.import_module(self.module_name)
        text_encoder = models.text_encoders[0] if len(models.text_encoders) == 1 else models.text_encoders
        multipliers = args.base_weights_multiplier or []
        for i, file in enumerate(args.base_weights or []):
            merged, weights = module.create_network_from_weights(
                multipliers[i] if i < len(multipliers) else 1.0, file, models.vae, text_encoder, models.unet,
                for_inference=True)
            merged.merge_to(text_encoder, models.unet, weights, torch.float32, next(models.unet.parameters()).device)
        if args.dim_from_weights:
            self.network, _ = module.create_network_from_weights(
                1.0, args.network_weights, models.vae, text_encoder, models.unet, **self.network_kwargs)
        else:
            self.network = module.create_network(
                1.0, args.network_dim, args.network_alpha, models.vae, text_encoder, models.unet,
                neuron_dropout=args.network_dropout, **self.network_kwargs,
            )
        if self.network is None:
            raise UserError(f"--network_module {self.module_name} created no network with these --network_args")
        self.network.apply_to(text_encoder, models.unet, self.train_te, self.train_unet)
        if args.network_weights:
            self.network.load_weights(args.network_weights)
        if args.gradient_checkpointing and hasattr(self.network, "enable_gradient_checkpointing"):
            self.network.enable_gradient_checkpointing()
        self.network.to(device)
        self.network.requires_grad_(True)

    def param_groups(self, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
        result = self.network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
        groups, descriptions = result if isinstance(result, tuple) else (result, None)
        if descriptions is None or len(descriptions) != len(groups):
            if len(groups) == 2 and self.train_te and self.train_unet:
                descriptions = ["textencoder", "unet"]
            elif len(groups) == 1:
                descriptions = ["unet" if self.train_unet else "textencoder"]
            else:
                descriptions = [f"group{i}" for i in range(len(groups))]
        return groups, [d.replace(" ", "_") for d in descriptions]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def train_mode(self, training: bool) -> None:
        self.network.train(training)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.network.state_dict()

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.network.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise UserError(f"the resumed state does not fit this network (missing {len(missing)} tensors, e.g. "
                            f"{missing[:2]}; unexpected {len(unexpected)}, e.g. {unexpected[:2]}): resume with the "
                            "same --network_module, --network_dim and --network_args as the saved run")

    def before_forward(self, batch: dict[str, Any]) -> None:
        multipliers = batch.get("network_multipliers")
        if multipliers is None:
            return
        values = multipliers.tolist()
        if all(v == values[0] for v in values):
            self.network.set_multiplier(float(values[0]))
        else:
            self.network.set_multiplier(multipliers.to(next(self.network.parameters()).device))

    def after_optimizer_step(self, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
        if args.scale_weight_norms is None:
            return {}
        keys_scaled, mean_norm, maximum_norm = self.network.apply_max_norm_regularization(args.scale_weight_norms,
                                                                                         device)
        return {"max_norm/keys_scaled": float(keys_scaled), "norm/avg_key_norm": float(mean_norm),
                "max_norm/max_key_norm": float(maximum_norm)}

    def cast_trained(self, dtype: torch.dtype) -> None:
        self.network.to(dtype)

    def save(self, path: Path, info: SaveInfo, args: argparse.Namespace) -> None:
        dtype = _save_dtype(getattr(args, "save_precision", None), next(self.network.parameters()).dtype)
        self.network.save_weights(str(path), dtype, info.metadata or None)
