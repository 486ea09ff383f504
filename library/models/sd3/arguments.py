"""SD3 / SD3.5 options (sd-scripts' names) and their checks, all before any model loads."""

from __future__ import annotations

import argparse
from typing import Any

from library.models.families.base import ModelFamily
from library.training.flow_matching import add_sd3_flow_arguments, flow_option_problems

DROPOUT_OPTIONS = ("clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate")
MEDIUM_ONLY = ("pos_emb_random_crop_rate", "enable_scaled_pos_embed")


def add_sd3_arguments(parser: argparse.ArgumentParser) -> None:
    """Model files, text, objective and memory options of the SD3 scripts."""
    from library.training.memory import add_memory_arguments

    g = parser.add_argument_group("SD3 / SD3.5")
    g.add_argument("--clip_l", type=str, default=None, help="CLIP-L file (default: the one inside the model file)")
    g.add_argument("--clip_g", type=str, default=None, help="CLIP-G file (default: the one inside the model file)")
    g.add_argument("--t5xxl", type=str, default=None, help="T5-XXL file (default: the one inside the model file)")
    g.add_argument("--save_clip", action="store_true", help="accepted for sd-scripts command lines; refused")
    g.add_argument("--save_t5xxl", action="store_true", help="accepted for sd-scripts command lines; refused")
    g.add_argument("--t5xxl_device", type=str, default=None, help="not supported (as in sd-scripts); refused")
    g.add_argument("--t5xxl_dtype", type=str, default=None, help="not supported (as in sd-scripts); refused")
    g.add_argument("--t5xxl_max_token_length", type=int, default=256, help="T5 tokens per caption (default 256)")
    g.add_argument("--apply_lg_attn_mask", action="store_true", help="give CLIP-L and CLIP-G the padding mask")
    g.add_argument("--apply_t5_attn_mask", action="store_true", help="give T5 the padding mask")
    for name, label in zip(DROPOUT_OPTIONS, ("CLIP-L", "CLIP-G", "T5")):
        g.add_argument(f"--{name}", type=float, default=0.0,
                       help=f"probability that a sample's {label} output is replaced by zeros (default 0.0)")
    g.add_argument("--pos_emb_random_crop_rate", type=float, default=0.0,
                   help="SD3.5 Medium: probability that a training step takes the position embedding at a random "
                        "place of its table instead of the centre (default 0.0)")
    g.add_argument("--enable_scaled_pos_embed", action="store_true",
                   help="SD3.5 Medium: position embeddings scaled for each dataset resolution (multi-resolution "
                        "training)")
    add_memory_arguments(g, swap_help="the last N joint blocks, at most the depth minus 2, as sd-scripts")
    add_sd3_flow_arguments(parser)


def add_sd3_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sd3_train_network.py`` only."""
    parser.add_argument("--save_lora_format", default="sd-scripts", choices=("sd-scripts", "diffusers"),
                        help="sd-scripts: networks.lora_sd3 names (ComfyUI, sd-scripts); diffusers: the PEFT layout "
                             "StableDiffusion3Pipeline.load_lora_weights reads (states and --resume are unchanged)")


def sd3_option_problems(args: argparse.Namespace, *, cuda: bool, trains_denoiser: bool = False) -> list[str]:
    """Every SD3 option problem that can be found from the flags alone (``trains_denoiser``: sd3_train.py)."""
    from library.training.memory import memory_option_problems

    problems = flow_option_problems(args) + memory_option_problems(args, cuda=cuda, trains_denoiser=trains_denoiser)
    for name, why in (("save_clip", "sd-scripts marks it 'DOES NOT WORK'"), ("save_t5xxl", "idem"),
                      ("t5xxl_device", "T5 runs on the training device"),
                      ("t5xxl_dtype", "T5 runs in the --mixed_precision dtype")):
        if getattr(args, name, None) not in (None, False):
            problems.append(f"--{name} is not supported ({why}); remove it")
    if args.t5xxl_max_token_length < 1:
        problems.append(f"--t5xxl_max_token_length must be positive, got {args.t5xxl_max_token_length}")
    for name in DROPOUT_OPTIONS:
        if not 0 <= getattr(args, name) <= 1:
            problems.append(f"--{name} must be a probability in [0, 1], got {getattr(args, name)}")
    if not 0 <= args.pos_emb_random_crop_rate <= 1:
        problems.append(f"--pos_emb_random_crop_rate must be in [0, 1], got {args.pos_emb_random_crop_rate}")
    for name, why in (("v2", "it selects Stable Diffusion 2.x"), ("clip_skip", "SD3 uses the penultimate layers"),
                      ("max_token_length", "CLIP takes 77 tokens; use --t5xxl_max_token_length for T5"),
                      ("weighted_captions", "SD3 captions are not weighted"),
                      ("xformers", "SD3 uses PyTorch SDPA attention")):
        if getattr(args, name, None) not in (None, False):
            problems.append(f"--{name} does not apply to SD3 ({why}); remove it")
    return problems


def sd3_family_problems(args: argparse.Namespace, family: ModelFamily, depth: int) -> list[str]:
    """Checks that need the variant (SD3.5 Medium-only options) or the depth (``--num_last_block_to_freeze``,
    ``--blocks_to_swap``)."""
    from library.models.families.sd3 import VARIANTS
    from library.training.memory import last_blocks_problems

    variant = family.base_model_version
    problems = []
    for name in MEDIUM_ONLY:
        if getattr(args, name, None) not in (None, False, 0, 0.0) and variant != "5-medium":
            problems.append(f"--{name} is an SD3.5 Medium option, and this model is {VARIANTS[variant]}; remove it")
    problems += last_blocks_problems(getattr(args, "blocks_to_swap", None) or 0, depth, "joint blocks")
    rates, _ = parse_block_lr(getattr(args, "block_lr", None))
    if rates is not None and len(rates) not in (depth, depth + 2):
        problems.append(f"--block_lr has {len(rates)} values; this {VARIANTS[variant]} model has {depth} joint blocks: "
                        f"give {depth} (one per joint block; the embedders and the final layer use --learning_rate) "
                        f"or {depth + 2} (the embedders, each joint block, the final layer)")
    freeze = getattr(args, "num_last_block_to_freeze", None)
    if freeze is not None and freeze > depth:
        problems.append(f"--num_last_block_to_freeze {freeze}: this {VARIANTS[variant]} model has only {depth} joint "
                        f"blocks; give at most {depth}")
    return problems


def parse_block_lr(text: str | None) -> tuple[list[float] | None, str | None]:
    """``(rates, problem)`` of ``sd3_train.py``'s ``--block_lr`` (comma-separated learning rates; the count is
    checked against the depth by :func:`sd3_family_problems`)."""
    if text is None:
        return None, None
    try:
        rates = [float(v) for v in text.split(",")]
    except ValueError:
        return None, f"--block_lr {text!r}: give comma-separated numbers, one learning rate per block"
    if any(not 0 <= r < float("inf") for r in rates):
        return None, f"--block_lr {text!r}: learning rates must be finite and not negative"
    return rates, None


def sd3_ss_metadata(args: argparse.Namespace) -> dict[str, str]:
    """The SD3 ``ss_*`` keys sd-scripts adds to its LoRA files."""
    values: dict[str, Any] = {
        "ss_apply_lg_attn_mask": bool(args.apply_lg_attn_mask), "ss_apply_t5_attn_mask": bool(args.apply_t5_attn_mask),
        "ss_weighting_scheme": args.weighting_scheme, "ss_logit_mean": args.logit_mean,
        "ss_logit_std": args.logit_std, "ss_mode_scale": args.mode_scale,
    }
    return {k: str(v) for k, v in values.items()}
