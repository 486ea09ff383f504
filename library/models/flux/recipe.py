"""The recipes of the FLUX scripts: ``flux_train_network.py`` (``networks.lora_flux``) and ``flux_train.py``
(the whole transformer, saved in the BFL single-file layout), each with FLUX's option checks."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from library.errors import UserError
from library.training.full_recipe import FINE_TUNING, FullWeightRecipe
from library.training.preparation import uses_cuda
from library.training.recipes import LoRARecipe, SaveInfo


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


def add_flux_full_arguments(parser: argparse.ArgumentParser) -> None:
    """``flux_train.py``'s options besides fine_tune.py's: the FLUX group and sd-scripts' saving/optimizer ones."""
    from library.models.flux.arguments import add_flux_arguments

    add_flux_arguments(parser)
    g = parser.add_argument_group("FLUX.1 fine-tuning")
    g.add_argument("--mem_eff_save", action="store_true",
                   help="write saved models one tensor at a time (the host never holds a second copy of the model)")
    g.add_argument("--blockwise_fused_optimizers", action="store_true",
                   help="one optimizer group per transformer block, stepped inside the backward pass as soon as "
                        "the block's gradients exist (any optimizer; only one block's gradients in memory)")
    g.add_argument("--fused_optimizer_groups", type=int, default=None,
                   help="not supported (sd-scripts: 'this option is not working'); use --blockwise_fused_optimizers")


_BLOCK = re.compile(r"^(single_transformer_blocks|transformer_blocks)\.(\d+)\.")


def block_of(name: str) -> str:
    """The ``--blockwise_fused_optimizers`` group of a diffusers FLUX parameter: ``double<i>``, ``single<i>`` or
    ``other`` (embedders, final layer), as sd-scripts groups the BFL names."""
    m = _BLOCK.match(name)
    if m is None:
        return "other"
    return f"{'single' if m.group(1).startswith('single') else 'double'}{m.group(2)}"


class FluxFullWeightRecipe(FullWeightRecipe):
    """Fine-tuning of the FLUX transformer (``flux_train.py``); CLIP-L and T5 stay frozen, as in sd-scripts."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(args, FINE_TUNING)
        self.save_format, self.file_extension = "safetensors", "safetensors"

    def option_problems(self, args: argparse.Namespace) -> list[str]:
        from library.models.flux.arguments import flux_option_problems
        from library.training.fused_backward import blockwise_problems

        problems = super().option_problems(args) + flux_option_problems(args, cuda=uses_cuda(), trains_denoiser=True)
        problems += blockwise_problems(args)
        if args.train_text_encoder:
            problems.append("--train_text_encoder: flux_train.py trains the FLUX transformer only (as sd-scripts); "
                            "CLIP-L and T5 stay frozen. Remove it, or train text-encoder LoRAs with "
                            "flux_train_network.py")
        if args.save_model_as not in (None, "safetensors"):
            problems.append(f"--save_model_as {args.save_model_as}: flux_train.py saves the transformer as one "
                            ".safetensors file in the BFL layout (flux1-dev.safetensors); use --save_model_as "
                            "safetensors or leave it out")
        if args.fused_optimizer_groups:
            problems.append("--fused_optimizer_groups does not work in sd-scripts either: use "
                            "--blockwise_fused_optimizers (any optimizer) or --fused_backward_pass (AdaFactor)")
        return problems

    def param_groups(self, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
        if not args.blockwise_fused_optimizers:
            return super().param_groups(args)
        blocks: dict[str, list] = {}
        for name, p in self.models.unet.named_parameters():
            blocks.setdefault(block_of(name), []).append(p)
        self._ensure_ema(args)
        return [{"params": ps, "lr": args.learning_rate} for ps in blocks.values()], list(blocks)

    def _write(self, path: Path, info: SaveInfo, args: argparse.Namespace) -> None:
        from library.models.flux.saving import save_flux_transformer
        from library.models.saving import save_dtype

        dtype = save_dtype(args.save_precision) or next(self.models.unet.parameters()).dtype
        save_flux_transformer(path, self.models.unet, dtype=dtype, metadata=info.metadata or None,
                              mem_eff=bool(args.mem_eff_save))
