"""The LoRA recipe of ``sd3_train_network.py``: ``networks.lora_sd3`` with SD3's option checks and the
per-encoder caption dropout."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from library.errors import UserError
from library.training.preparation import uses_cuda
from library.training.recipes import LoRARecipe, SaveInfo

SD3_NETWORK_MODULE = "networks.lora_sd3"


def dropout_rates(args: argparse.Namespace) -> tuple[float, float, float]:
    return float(args.clip_l_dropout_rate), float(args.clip_g_dropout_rate), float(args.t5_dropout_rate)


def wrap_text_dropout(text: Any, rates: tuple[float, float, float]) -> Any:
    """The loop's text conditioner, with ``--clip_l_dropout_rate`` / ``--clip_g_dropout_rate`` /
    ``--t5_dropout_rate`` applied while training."""
    from library.models.sd3.text import DroppingConditioner, TextDropout

    dropout = TextDropout(rates)
    return DroppingConditioner(text, dropout) if dropout.active else text


class SD3LoRARecipe(LoRARecipe):
    """:class:`LoRARecipe` whose option checks add SD3's (objective, model files, GPU-only options)."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.dropout_rates = dropout_rates(args)
        self.save_format = getattr(args, "save_lora_format", "sd-scripts")
        self.text: Any = None
        self.resolutions: list[tuple[int, int]] = []
        self.position: Any = None  # the SD3.5 Medium position-embedding options, when given

    def prepare_dataset(self, group: Any) -> None:
        from library.models.sd3.pos_embed import dataset_resolutions

        self.resolutions = dataset_resolutions(group)

    def setup(self, models: Any, args: argparse.Namespace, device: Any) -> None:
        from library.models.sd3.pos_embed import apply_position_options

        super().setup(models, args, device)
        self.position = apply_position_options(models.unet, args, self.resolutions)

    def option_problems(self, args: argparse.Namespace) -> list[str]:
        from library.models.sd3.arguments import sd3_option_problems
        from library.training.network_args import parse_network_args
        from networks.lora_sd3_options import parse_sd3_network_kwargs

        problems = super().option_problems(args) + sd3_option_problems(args, cuda=uses_cuda())
        if self.module_name != SD3_NETWORK_MODULE:
            problems.append(f"--network_module {self.module_name}: SD3 LoRAs are made by {SD3_NETWORK_MODULE} "
                            f"(networks.lora finds no MMDiT layers, although sd-scripts' SD3 docs show it); use "
                            f"--network_module {SD3_NETWORK_MODULE}")
        else:
            try:
                options = parse_sd3_network_kwargs(parse_network_args(args.network_args, self.module_name))
            except UserError as err:
                problems.extend(err.items())
            else:
                problems += self._format_problems(args, options)
                if options.train_t5xxl and (args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk):
                    problems.append("--network_args train_t5xxl=True trains T5, whose outputs then cannot be cached; "
                                    "remove --cache_text_encoder_outputs or train_t5xxl")
        return problems

    def _format_problems(self, args: argparse.Namespace, options: Any) -> list[str]:
        from networks.lora_sd3 import diffusers_format_problem

        if self.save_format != "diffusers":
            return []
        problems = [p for p in (diffusers_format_problem(options),) if p]
        if self.file_extension != "safetensors":
            problems.append("--save_lora_format diffusers writes .safetensors files; remove --save_model_as")
        return problems

    def save(self, path: Path, info: SaveInfo, args: argparse.Namespace) -> None:
        """sd-scripts' file, or with ``--save_lora_format diffusers`` the layout diffusers loads."""
        if self.save_format != "diffusers":
            return super().save(path, info, args)
        from library.models.metadata import save_safetensors
        from library.training.recipes import _save_dtype

        dtype = _save_dtype(getattr(args, "save_precision", None), next(self.network.parameters()).dtype)
        save_safetensors(path, self.network.diffusers_state_dict(dtype), info.metadata or None)

    def text_conditioning(self, text: Any) -> Any:
        self.text = wrap_text_dropout(text, self.dropout_rates)
        return self.text

    def train_mode(self, training: bool) -> None:
        super().train_mode(training)
        for part in (self.text, self.position):
            if hasattr(part, "training"):
                part.training = training

    def sample(self, run: Any, global_step: int, epoch: int | None) -> None:
        from library.models.sd3.sampling import sample_sd3

        sample_sd3(run, global_step, epoch)
