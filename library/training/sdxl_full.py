"""sdxl_train.py's recipe: the full-weight recipe with SDXL's options (``--learning_rate_te1``/``_te2`` for
the two text encoders, ``--block_lr`` with 23 UNet block learning rates, as sd-scripts)."""

from __future__ import annotations

import argparse
from typing import Any

from library.training.full_recipe import FullWeightRecipe


def add_sdxl_full_arguments(parser: argparse.ArgumentParser) -> None:
    """The SDXL options of sd-scripts' ``sdxl_train.py`` (besides those of fine_tune.py)."""
    g = parser.add_argument_group("SDXL")
    g.add_argument("--learning_rate_te1", type=float, default=None,
                   help="learning rate of text encoder 1 (CLIP ViT-L; default: --learning_rate_te or --learning_rate)")
    g.add_argument("--learning_rate_te2", type=float, default=None,
                   help="learning rate of text encoder 2 (OpenCLIP bigG; default: --learning_rate_te or --learning_rate)")
    g.add_argument("--block_lr", type=str, default=None,
                   help="23 comma-separated UNet learning rates: time/label embedding, 9 input blocks, 3 middle-block "
                        "parts, 9 output blocks, output layers (0 leaves a block unchanged)")
    g.add_argument("--fused_optimizer_groups", type=int, default=None,
                   help="cut the trained parameters into about this many groups and update each group inside the "
                        "backward pass as soon as its gradients exist (any optimizer; gradients are clipped per "
                        "tensor), so only one group's gradients are held at a time")
    add_sdxl_model_arguments(g)


def add_sdxl_model_arguments(group: Any) -> None:
    """Options of both SDXL scripts (sd-scripts' ``add_sdxl_training_arguments``) not shared with SD1.x."""
    group.add_argument("--disable_mmap_load_safetensors", action="store_true",
                       help="accepted for compatibility: weights are always read into memory once, the file is not "
                            "kept mapped")


def parse_block_lr(text: str | None) -> tuple[list[float] | None, str | None]:
    """``(rates, problem)`` for ``--block_lr``."""
    from library.models.families.sdxl import BLOCK_LR_COUNT

    if text is None:
        return None, None
    try:
        rates = [float(v) for v in text.split(",")]
    except ValueError:
        return None, f"--block_lr {text!r}: every value must be a number"
    if len(rates) != BLOCK_LR_COUNT:
        return None, (f"--block_lr has {len(rates)} values; SDXL needs {BLOCK_LR_COUNT}: time/label embedding, 9 input "
                      "blocks, 3 middle-block parts, 9 output blocks and the output layers, in that order")
    if any(r < 0 for r in rates):
        return None, "--block_lr: learning rates must not be negative"
    return rates, None


class SDXLFullWeightRecipe(FullWeightRecipe):
    """Fine-tuning/DreamBooth of a whole SDXL model (``sdxl_train.py``)."""

    def option_problems(self, args: argparse.Namespace) -> list[str]:
        problems = super().option_problems(args)
        self.block_lr, problem = parse_block_lr(args.block_lr)
        problems += [problem] if problem else []
        for name in ("learning_rate_te1", "learning_rate_te2"):
            if getattr(args, name) is not None and not self.train_te:
                problems.append(f"--{name} is given but the text encoders do not train: add --train_text_encoder")
        if args.fused_optimizer_groups is not None:
            from library.training.fused_backward import blockwise_problems

            problems += blockwise_problems(args)
        return problems

    def param_groups(self, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
        from library.models.families.sdxl import block_lr_index

        unet = self.models.unet
        if self.block_lr is None:
            groups, names = [{"params": list(unet.parameters()), "lr": args.learning_rate}], ["unet"]
        else:
            blocks: dict[int, list] = {}
            for name, p in unet.named_parameters():
                blocks.setdefault(block_lr_index(unet, name), []).append(p)
            groups = [{"params": blocks[i], "lr": self.block_lr[i]} for i in sorted(blocks)]
            names = [f"unet_block{i}" for i in sorted(blocks)]
        if self.train_te:
            base = args.learning_rate_te if args.learning_rate_te is not None else args.learning_rate
            for i, (te, lr) in enumerate(zip(self.models.text_encoders, (args.learning_rate_te1, args.learning_rate_te2))):
                groups.append({"params": list(te.parameters()), "lr": base if lr is None else lr})
                names.append(f"textencoder{i + 1}")
        self._ensure_ema(args)
        if args.fused_optimizer_groups:
            from library.training.fused_backward import split_param_groups

            return split_param_groups(groups, names, args.fused_optimizer_groups)
        return groups, names
