"""``sd3_train.py``'s recipe: the full-weight recipe with SD3's options (sd-scripts' names): the MMDiT always,
CLIP-L and CLIP-G with ``--train_text_encoder``, T5 also with ``--train_t5xxl``, one learning rate per encoder
(``--learning_rate_te1/te2/te3``), the last N joint blocks frozen with ``--num_last_block_to_freeze``, per-block
learning rates (``--block_lr``) and optimizer steps (``--blockwise_fused_optimizers``), T5's outputs cached while
the CLIPs train (``--use_t5xxl_cache_only``), and saves in the SAI single-file layout (MMDiT + VAE, plus every
trained text encoder; ``--save_clip`` / ``--save_t5xxl`` add frozen ones) or as a diffusers folder."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

from library.training.full_recipe import FullWeightRecipe
from library.training.recipes import SaveInfo

_JOINT = re.compile(r"^transformer_blocks\.(\d+)\.")
_FINAL = ("norm_out.", "proj_out.")


def add_sd3_full_arguments(parser: argparse.ArgumentParser) -> None:
    """sd-scripts' ``sd3_train.py`` options besides those of fine_tune.py."""
    from library.models.sd3.arguments import add_sd3_arguments

    add_sd3_arguments(parser)
    g = parser.add_argument_group("SD3 full fine-tuning")
    g.add_argument("--train_t5xxl", action="store_true", help="train T5 too (with --train_text_encoder)")
    for i, name in ((1, "CLIP-L"), (2, "CLIP-G"), (3, "T5")):
        g.add_argument(f"--learning_rate_te{i}", type=float, default=None,
                       help=f"learning rate of {name} (default: --learning_rate_te, else --learning_rate)")
    g.add_argument("--num_last_block_to_freeze", type=int, default=None,
                   help="freeze the last N joint blocks of the MMDiT (whole blocks; at most the model's depth)")
    g.add_argument("--block_lr", type=str, default=None,
                   help="comma-separated MMDiT learning rates: one per joint block (the embedders and final layer "
                        "use --learning_rate), or the embedders, each joint block and the final layer")
    g.add_argument("--blockwise_fused_optimizers", action="store_true",
                   help="one optimizer group per joint block (and the embedders, the final layer, each trained text "
                        "encoder), stepped inside the backward pass as soon as its gradients exist (any optimizer)")
    g.add_argument("--fused_optimizer_groups", type=int, default=None,
                   help="not supported (sd-scripts: 'DOES NOT WORK'); use --blockwise_fused_optimizers")
    g.add_argument("--use_t5xxl_cache_only", action="store_true",
                   help="with --train_text_encoder: cache T5's outputs before training and free T5; CLIP-L and "
                        "CLIP-G encode every step")
    g.add_argument("--skip_latents_validity_check", action="store_true", help="accepted (deprecated in sd-scripts)")
    g.add_argument("--disable_mmap_load_safetensors", action="store_true",
                   help="accepted: weights are always read into memory once")


def block_of(name: str) -> str:
    """The ``--block_lr`` / ``--blockwise_fused_optimizers`` group of a diffusers MMDiT parameter: ``joint<i>``,
    ``final`` (norm_out, proj_out) or ``embedders`` (patch, time, pooled-text and context embedders)."""
    m = _JOINT.match(name)
    if m is not None:
        return f"joint{m.group(1)}"
    return "final" if name.startswith(_FINAL) else "embedders"


def block_rate(block: str, rates: list[float] | None, depth: int, default: float) -> float:
    """The learning rate of ``block`` under ``--block_lr`` (``depth`` values: joint blocks only; ``depth + 2``:
    the embedders first and the final layer last)."""
    if rates is None:
        return default
    offset = 1 if len(rates) == depth + 2 else 0
    if block.startswith("joint"):
        return rates[offset + int(block[len("joint"):])]
    if not offset:
        return default
    return rates[0] if block == "embedders" else rates[-1]


class SD3FullWeightRecipe(FullWeightRecipe):
    """Fine-tuning of a whole SD3 / SD3.5 model (``sd3_train.py``)."""

    def __init__(self, args: argparse.Namespace, style: str):
        super().__init__(args, style)
        from library.models.sd3.recipe import dropout_rates

        self.train_t5 = bool(args.train_t5xxl) and self.train_te
        self.freeze_last = int(args.num_last_block_to_freeze or 0)
        self.dropout_rates = dropout_rates(args)
        self.save_roles = {r for r, on in (("clip_l", self.train_te or args.save_clip),
                                           ("clip_g", self.train_te or args.save_clip),
                                           ("t5xxl", self.train_t5 or args.save_t5xxl)) if on}
        self.text: Any = None
        self.block_lr: list[float] | None = None
        self.t5_cache_only = bool(args.use_t5xxl_cache_only)
        # T5 is freed once its outputs are cached unless a later save writes it
        self.keeps_t5 = "t5xxl" in self.save_roles or self.save_format != "safetensors"
        self.sample_texts: list[str] = []  # the sample prompts' texts, cached with the captions
        self.device: torch.device | None = None
        self.group: Any = None
        self.resolutions: list[tuple[int, int]] = []
        self.position: Any = None  # the SD3.5 Medium position-embedding options, when given

    def option_problems(self, args: argparse.Namespace) -> list[str]:
        from library.models.sd3.arguments import parse_block_lr, sd3_option_problems
        from library.training.fused_backward import blockwise_problems
        from library.training.preparation import uses_cuda

        problems = super().option_problems(args)
        if self.t5_cache_only:  # sd-scripts: T5's outputs may be cached while the CLIPs train
            problems = [p for p in problems if not p.startswith("--cache_text_encoder_outputs needs a frozen")]
        problems += [p for p in sd3_option_problems(args, cuda=uses_cuda(), trains_denoiser=True)
                     if not p.startswith(("--save_clip ", "--save_t5xxl "))]
        self.block_lr, problem = parse_block_lr(args.block_lr)
        problems += [problem] if problem else []
        problems += blockwise_problems(args) + self._t5_cache_problems(args)
        if args.fused_optimizer_groups is not None:
            problems.append("--fused_optimizer_groups does not work in sd-scripts either: use "
                            "--blockwise_fused_optimizers (any optimizer) or --fused_backward_pass (AdaFactor)")
        if args.train_t5xxl and not self.train_te:
            problems.append("--train_t5xxl needs --train_text_encoder (as in sd-scripts)")
        for i in (1, 2, 3):
            trains = self.train_te if i < 3 else self.train_t5
            if getattr(args, f"learning_rate_te{i}") is not None and not trains:
                problems.append(f"--learning_rate_te{i} is given but that text encoder does not train")
        if args.num_last_block_to_freeze is not None and args.num_last_block_to_freeze < 0:
            problems.append(f"--num_last_block_to_freeze must not be negative, got {args.num_last_block_to_freeze}")
        if self.save_format not in ("safetensors", "diffusers", "diffusers_safetensors"):
            problems.append(f"--save_model_as {self.save_format}: SD3 models are saved as safetensors (the single "
                            "file) or diffusers / diffusers_safetensors (a folder)")
        return problems

    def _t5_cache_problems(self, args: argparse.Namespace) -> list[str]:
        if not self.t5_cache_only:
            return []
        problems = []
        if not self.train_te:
            problems.append("--use_t5xxl_cache_only caches T5's outputs so that CLIP-L and CLIP-G can train; without "
                            "--train_text_encoder every text encoder is frozen and --cache_text_encoder_outputs "
                            "caches all three: add --train_text_encoder or use --cache_text_encoder_outputs")
        if args.train_t5xxl:
            problems.append("--use_t5xxl_cache_only cannot be combined with --train_t5xxl: a training T5's outputs "
                            "change at every step (as in sd-scripts); remove one of them")
        return problems

    def dataset_problems(self, params: Any) -> list[str]:
        from library.training.text_cache import caption_variation_reasons

        if not self.t5_cache_only:
            return []
        return [f"--use_t5xxl_cache_only: T5's outputs are computed once per caption, but captions change every "
                f"step ({reason}); remove the option or the caption randomization"
                for reason in caption_variation_reasons(params)]

    def prepare_dataset(self, group: Any) -> None:
        from library.models.sd3.pos_embed import dataset_resolutions

        self.group = group  # --use_t5xxl_cache_only caches T5's outputs of every caption
        self.resolutions = dataset_resolutions(group)  # the position-embedding options' sizes

    def setup(self, models: Any, args: argparse.Namespace, device: torch.device) -> None:
        from library.models.sd3.pos_embed import apply_position_options

        super().setup(models, args, device)
        self.position = apply_position_options(models.unet, args, self.resolutions)
        self.device = device
        if self.t5_cache_only:
            from library.training.sampling import validate_sampling_args

            self.sample_texts = [t for p in validate_sampling_args(args) for t in (p.prompt, p.negative_prompt)]
        models.text_encoders[2].requires_grad_(self.train_t5)
        blocks = models.unet.transformer_blocks
        for block in list(blocks)[len(blocks) - self.freeze_last:] if self.freeze_last else []:
            block.requires_grad_(False)

    def _modules(self) -> list[tuple[str, torch.nn.Module]]:
        modules: list[tuple[str, torch.nn.Module]] = [("unet", self.models.unet)]
        if self.train_te:
            encoders = self.models.text_encoders[: 3 if self.train_t5 else 2]
            modules += [(f"text_encoder{i or ''}", te) for i, te in enumerate(encoders)]
        return modules

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, module in self._modules() for p in module.parameters() if p.requires_grad]

    def text_encoder_trains_at(self, global_step: int) -> bool:
        return self.train_te

    def train_mode(self, training: bool) -> None:
        self.models.unet.train(training)
        for i, te in enumerate(self.models.text_encoders):
            te.train(training and self.train_te and (i < 2 or self.train_t5))
        for part in (self.text, self.position):
            if hasattr(part, "training"):
                part.training = training

    def param_groups(self, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
        """The MMDiT as one group, or one per block (embedders, each joint block, final layer) with
        ``--block_lr`` / ``--blockwise_fused_optimizers``; then one group per trained text encoder."""
        unet = [(n, p) for n, p in self.models.unet.named_parameters() if p.requires_grad]
        if self.block_lr is None and not args.blockwise_fused_optimizers:
            groups, names = [{"params": [p for _, p in unet], "lr": args.learning_rate}], ["unet"]
        else:
            blocks: dict[str, list] = {}
            for name, p in unet:
                blocks.setdefault(block_of(name), []).append(p)
            depth = len(self.models.unet.transformer_blocks)
            groups = [{"params": ps, "lr": block_rate(b, self.block_lr, depth, args.learning_rate)}
                      for b, ps in blocks.items()]
            names = [f"unet_{b}" for b in blocks]
        base = args.learning_rate_te if args.learning_rate_te is not None else args.learning_rate
        for i, (name, te) in enumerate(self._modules()[1:]):
            lr = getattr(args, f"learning_rate_te{i + 1}")
            groups.append({"params": list(te.parameters()), "lr": base if lr is None else lr})
            names.append(f"textencoder{i + 1}")
        self._ensure_ema(args)
        return groups, names

    def text_conditioning(self, text: Any) -> Any:
        from library.models.sd3.recipe import wrap_text_dropout
        from library.models.sd3.text import t5_cached_text

        if self.t5_cache_only:
            captions = list(dict.fromkeys(self.group.fixed_captions() + self.sample_texts))
            text = t5_cached_text(text, self.models, captions, self.device, release=not self.keeps_t5)
        self.text = wrap_text_dropout(text, self.dropout_rates)
        return self.text

    def _write(self, path: Path, info: SaveInfo, args: argparse.Namespace) -> None:
        from library.models.saving import save_dtype
        from library.models.sd3.saving import save_sd3_model

        dtype = save_dtype(args.save_precision) or next(self.models.unet.parameters()).dtype
        save_sd3_model(path, self.models, fmt=self.save_format, dtype=dtype, metadata=info.metadata or None,
                       text_roles=self.save_roles)

    def metadata(self, args: argparse.Namespace) -> dict[str, str]:
        return {**super().metadata(args), "ss_t5xxl_trained": str(self.train_t5)}

    def sample(self, run: Any, global_step: int, epoch: int | None) -> None:
        from library.models.sd3.sampling import sample_sd3

        sample_sd3(run, global_step, epoch)
