"""SD3 / SD3.5 options (sd-scripts' names) and their checks, all before any model loads."""

from __future__ import annotations

import argparse
from typing import Any

from library.models.families.base import ModelFamily
from library.training.flow_matching import add_sd3_flow_arguments, flow_option_problems

# GPU-only memory options: accepted by the parser so that sd-scripts command lines parse, then refused
GPU_OPTIONS = ("fp8_base", "fp8_base_unet", "blocks_to_swap", "cpu_offload_checkpointing")
DROPOUT_OPTIONS = ("clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate")
MEDIUM_ONLY = ("pos_emb_random_crop_rate", "enable_scaled_pos_embed")


def add_sd3_arguments(parser: argparse.ArgumentParser) -> None:
    """Model files, text, objective and memory options of the SD3 scripts."""
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
    g.add_argument("--fp8_base", action="store_true", help="store the frozen base in fp8 (CUDA only; not yet)")
    g.add_argument("--fp8_base_unet", action="store_true", help="fp8 for the MMDiT only (CUDA only; not yet)")
    g.add_argument("--blocks_to_swap", type=int, default=None,
                   help="stream this many blocks between CPU and GPU (CUDA only; not yet)")
    g.add_argument("--cpu_offload_checkpointing", action="store_true",
                   help="offload checkpointed activations to the CPU (CUDA only; not yet)")
    add_sd3_flow_arguments(parser)


def add_sd3_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sd3_train_network.py`` only."""
    parser.add_argument("--save_lora_format", default="sd-scripts", choices=("sd-scripts", "diffusers"),
                        help="sd-scripts: networks.lora_sd3 names (ComfyUI, sd-scripts); diffusers: the PEFT layout "
                             "StableDiffusion3Pipeline.load_lora_weights reads (states and --resume are unchanged)")


def sd3_option_problems(args: argparse.Namespace, *, cuda: bool) -> list[str]:
    """Every SD3 option problem that can be found from the flags alone."""
    problems = flow_option_problems(args)
    for name in GPU_OPTIONS:
        if getattr(args, name, None) not in (None, False, 0):
            where = "this machine has no CUDA device" if not cuda else "it is not implemented in this toolkit yet"
            problems.append(f"--{name} is a GPU memory option for SD3 and {where}; remove it (the model is kept in "
                            "the --mixed_precision dtype)")
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
    """Checks that need the variant (SD3.5 Medium-only options) or the depth (``--num_last_block_to_freeze``)."""
    from library.models.families.sd3 import VARIANTS

    variant = family.base_model_version
    problems = []
    for name in MEDIUM_ONLY:
        if getattr(args, name, None) not in (None, False, 0, 0.0) and variant != "5-medium":
            problems.append(f"--{name} is an SD3.5 Medium option, and this model is {VARIANTS[variant]}; remove it")
    freeze = getattr(args, "num_last_block_to_freeze", None)
    if freeze is not None and freeze > depth:
        problems.append(f"--num_last_block_to_freeze {freeze}: this {VARIANTS[variant]} model has only {depth} joint "
                        f"blocks; give at most {depth}")
    return problems


def sd3_ss_metadata(args: argparse.Namespace) -> dict[str, str]:
    """The SD3 ``ss_*`` keys sd-scripts adds to its LoRA files."""
    values: dict[str, Any] = {
        "ss_apply_lg_attn_mask": bool(args.apply_lg_attn_mask), "ss_apply_t5_attn_mask": bool(args.apply_t5_attn_mask),
        "ss_weighting_scheme": args.weighting_scheme, "ss_logit_mean": args.logit_mean,
        "ss_logit_std": args.logit_std, "ss_mode_scale": args.mode_scale,
    }
    return {k: str(v) for k, v in values.items()}
