"""The LoRA recipe of ``lumina_train_network.py``: ``networks.lora_lumina`` with Lumina's option checks and
attention kernels."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from library.errors import UserError
from library.training.preparation import uses_cuda
from library.training.recipes import LoRARecipe

logger = logging.getLogger(__name__)


def prepare_lumina_transformer(models: Any, args: argparse.Namespace, device: torch.device) -> None:
    """``--use_flash_attn`` (or SDPA) on the transformer, said once. ``--cpu_offload_checkpointing`` is the shared
    offloading checkpoint that model preparation installs for every family."""
    from library.models.lumina.attention import set_lumina_attention

    kernel = set_lumina_attention(models.unet, bool(args.use_flash_attn), device)
    (logger.warning if args.use_flash_attn and kernel != "flash-attn" else logger.info)("Lumina attention: %s", kernel)


class LuminaLoRARecipe(LoRARecipe):
    """:class:`LoRARecipe` whose option checks add Lumina's (flow matching, model files, GPU-only options)."""

    def option_problems(self, args: argparse.Namespace) -> list[str]:
        from library.models.lumina.arguments import lumina_option_problems
        from library.training.network_args import parse_network_args
        from networks.lora_lumina import parse_lumina_network_kwargs

        problems = super().option_problems(args) + lumina_option_problems(args, cuda=uses_cuda())
        if self.module_name == "networks.lora_lumina":
            try:
                parse_lumina_network_kwargs(parse_network_args(args.network_args, self.module_name))
            except UserError as err:
                problems.extend(err.items())
        return problems

    def setup(self, models: Any, args: argparse.Namespace, device: torch.device) -> None:
        prepare_lumina_transformer(models, args, device)
        super().setup(models, args, device)

    def sample(self, run: Any, global_step: int, epoch: int | None) -> None:
        from library.models.lumina.sampling import generate_lumina_samples

        generate_lumina_samples(run, global_step, epoch)
