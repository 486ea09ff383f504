"""The recipe of ``lumina_train.py``: the whole Lumina transformer trains (Gemma2 stays frozen, as in sd-scripts)
and is saved in the Next-DiT single-file layout.

``--blockwise_fused_optimizers`` makes one optimizer group per transformer block (``layers.N``, each refiner
block, the rest), stepped inside backward as soon as the block's gradients exist
(``library.training.fused_backward.BlockwiseSteps``, shared with ``flux_train.py``). ``--mem_eff_save`` writes the
file one tensor at a time (``library.models.safetensors_stream``).
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

import torch

from library.training.full_recipe import FullWeightRecipe
from library.training.recipes import SaveInfo

logger = logging.getLogger(__name__)


def add_lumina_full_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of sd-scripts' ``lumina_train.py`` (besides those of fine_tune.py)."""
    from library.models.lumina.arguments import add_lumina_arguments

    add_lumina_arguments(parser)
    g = parser.add_argument_group("lumina_train.py")
    g.add_argument("--mem_eff_save", action="store_true",
                   help="write saved models one tensor at a time (no second copy of the weights in memory)")
    g.add_argument("--blockwise_fused_optimizers", action="store_true",
                   help="update each parameter during backward as soon as its gradient is ready, with any "
                        "per-parameter optimizer (less memory: no full set of gradients)")
    g.add_argument("--fused_optimizer_groups", type=int, default=None,
                   help="not working in sd-scripts; refused here (use --blockwise_fused_optimizers)")
    g.add_argument("--skip_latents_validity_check", action="store_true",
                   help="deprecated in sd-scripts; no effect here: latent caches are keyed by image content")


_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner)\.(\d+)\.")


def block_of(name: str) -> str:
    """The ``--blockwise_fused_optimizers`` group of a diffusers Lumina parameter: ``layers3``, ``noise_refiner0``,
    ``context_refiner1`` or ``other`` (embedders, final layer)."""
    m = _BLOCK.match(name)
    return "other" if m is None else f"{m.group(1)}{m.group(2)}"


class LuminaFullWeightRecipe(FullWeightRecipe):
    """:class:`FullWeightRecipe` for the Lumina transformer (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, style: str):
        super().__init__(args, style)
        self.save_format, self.file_extension = "safetensors", "safetensors"

    def option_problems(self, args: argparse.Namespace) -> list[str]:
        from library.models.lumina.arguments import lumina_option_problems
        from library.training.fused_backward import blockwise_problems
        from library.training.preparation import uses_cuda

        problems = super().option_problems(args)
        problems += lumina_option_problems(args, cuda=uses_cuda(), trains_denoiser=True)
        if self.train_te:
            problems.append("--train_text_encoder: lumina_train.py trains the transformer only (Gemma2 stays frozen, "
                            "as in sd-scripts); remove it")
        if args.save_model_as not in (None, "safetensors"):
            problems.append(f"--save_model_as {args.save_model_as}: lumina_train.py saves the single-file (Next-DiT) "
                            "layout that sd-scripts and ComfyUI load; use --save_model_as safetensors or leave it out")
        if args.fused_optimizer_groups:
            problems.append("--fused_optimizer_groups does not work in sd-scripts and is not supported here; use "
                            "--blockwise_fused_optimizers")
        return problems + blockwise_problems(args)

    def param_groups(self, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
        if not args.blockwise_fused_optimizers:
            return super().param_groups(args)
        blocks: dict[str, list] = {}
        for name, p in self.models.unet.named_parameters():
            blocks.setdefault(block_of(name), []).append(p)
        self._ensure_ema(args)
        return [{"params": ps, "lr": args.learning_rate} for ps in blocks.values()], list(blocks)

    def setup(self, models: Any, args: argparse.Namespace, device: torch.device) -> None:
        from library.models.lumina.recipe import prepare_lumina_transformer

        if args.skip_latents_validity_check:
            logger.warning("--skip_latents_validity_check has no effect: latent caches are keyed by image content")
        prepare_lumina_transformer(models, args, device)
        super().setup(models, args, device)

    def sample(self, run: Any, global_step: int, epoch: int | None) -> None:
        from library.models.lumina.sampling import generate_lumina_samples

        generate_lumina_samples(run, global_step, epoch)

    def _write(self, path: Path, info: SaveInfo, args: argparse.Namespace) -> None:
        from library.models.lumina.saving import save_lumina_transformer
        from library.models.saving import save_dtype

        dtype = save_dtype(args.save_precision) or next(self.models.unet.parameters()).dtype
        save_lumina_transformer(path, self.models.unet, dtype=dtype, metadata=info.metadata or None,
                                mem_eff=bool(args.mem_eff_save))
