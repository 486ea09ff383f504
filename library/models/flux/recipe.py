"""The LoRA recipe of ``flux_train_network.py``: ``networks.lora_flux`` with FLUX's option checks."""

from __future__ import annotations

import argparse

from library.errors import UserError
from library.training.preparation import uses_cuda
from library.training.recipes import LoRARecipe


class FluxLoRARecipe(LoRARecipe):
    """:class:`LoRARecipe` whose option checks add FLUX's (flow matching, model files, GPU-only options)."""

    def option_problems(self, args: argparse.Namespace) -> list[str]:
        from library.models.flux.arguments import flux_option_problems
        from library.training.network_args import parse_network_args
        from networks.lora_flux_options import parse_flux_network_kwargs

        problems = super().option_problems(args) + flux_option_problems(args, cuda=uses_cuda())
        if self.module_name == "networks.lora_flux":
            try:
                parse_flux_network_kwargs(parse_network_args(args.network_args, self.module_name))
            except UserError as err:
                problems.extend(err.items())
        return problems
