"""FLUX.1 options (sd-scripts' names) and their checks, all before any model loads."""

from __future__ import annotations

import argparse
from typing import Any

from library.models.families.base import ModelFamily
from library.models.families.flux import is_dev
from library.training.flow_matching import FlowDefaults, add_flow_matching_arguments, flow_option_problems

FLUX_FLOW_DEFAULTS = FlowDefaults(timestep_sampling="sigma", discrete_flow_shift=3.0, model_prediction_type="raw")
DEV_GUIDANCE = 3.5


def add_flux_arguments(parser: argparse.ArgumentParser) -> None:
    """Model files, text, guidance, flow matching and memory options of the FLUX scripts."""
    from library.training.memory import add_memory_arguments

    g = parser.add_argument_group("FLUX.1")
    g.add_argument("--clip_l", type=str, default=None, help="CLIP-L text encoder file (clip_l.safetensors)")
    g.add_argument("--t5xxl", type=str, default=None, help="T5-XXL text encoder file (t5xxl_fp16.safetensors)")
    g.add_argument("--ae", type=str, default=None, help="autoencoder file (ae.safetensors)")
    g.add_argument("--t5xxl_max_token_length", type=int, default=None,
                   help="T5 tokens per caption (default 512 for dev, 256 for schnell)")
    g.add_argument("--apply_t5_attn_mask", action="store_true",
                   help="mask T5 padding in the T5 encoder and in the transformer's attention")
    g.add_argument("--guidance_scale", type=float, default=None,
                   help=f"guidance given to dev models while training (default {DEV_GUIDANCE}; schnell: 1.0)")
    g.add_argument("--model_type", default="flux", choices=("flux",), help="only 'flux' (Chroma is not supported)")
    add_memory_arguments(g, swap_help="as sd-scripts counts them: N//2 double and 2*(N-N//2) single blocks")
    add_flow_matching_arguments(parser, FLUX_FLOW_DEFAULTS)


def resolved_guidance(args: argparse.Namespace, family: ModelFamily) -> float:
    if args.guidance_scale is not None:
        return float(args.guidance_scale)
    return DEV_GUIDANCE if is_dev(family) else 1.0


def resolved_t5_length(args: argparse.Namespace, family: ModelFamily) -> int:
    if args.t5xxl_max_token_length is not None:
        return int(args.t5xxl_max_token_length)
    return 512 if is_dev(family) else 256


def flux_family_problems(args: argparse.Namespace, family: ModelFamily) -> list[str]:
    """Checks that need to know dev from schnell."""
    if not is_dev(family) and args.guidance_scale is not None and args.guidance_scale != 1.0:
        return [f"--guidance_scale {args.guidance_scale}: FLUX.1 schnell has no guidance embedding, so training "
                "guidance means nothing; remove --guidance_scale or set it to 1.0"]
    return []


def flux_option_problems(args: argparse.Namespace, *, cuda: bool, trains_denoiser: bool = False) -> list[str]:
    """Every FLUX option problem that can be found from the flags alone (``trains_denoiser``: flux_train.py)."""
    from library.training.memory import memory_option_problems

    problems = flow_option_problems(args) + memory_option_problems(args, cuda=cuda, trains_denoiser=trains_denoiser)
    if args.t5xxl_max_token_length is not None and args.t5xxl_max_token_length < 1:
        problems.append(f"--t5xxl_max_token_length must be positive, got {args.t5xxl_max_token_length}")
    for name, why in (("v2", "it selects Stable Diffusion 2.x"), ("clip_skip", "FLUX uses CLIP-L's pooled output"),
                      ("max_token_length", "use --t5xxl_max_token_length"),
                      ("weighted_captions", "caption weights such as (word:1.2) are not applied to CLIP-L's pooled "
                       "output or T5, here or in sd-scripts' FLUX scripts, so they would stay in the text as "
                       "characters"), ("vae", "use --ae"),
                      ("xformers", "FLUX uses PyTorch SDPA attention")):
        if getattr(args, name, None) not in (None, False):
            problems.append(f"--{name} does not apply to FLUX.1 ({why}); remove it")
    module = getattr(args, "network_module", None)
    if module is not None and module != "networks.lora_flux":
        problems.append(f"--network_module {module}: FLUX LoRAs are made by networks.lora_flux (networks.lora finds "
                        "no FLUX layers); use --network_module networks.lora_flux")
    return problems


def flux_ss_metadata(args: argparse.Namespace, family: ModelFamily) -> dict[str, str]:
    """The FLUX ``ss_*`` keys sd-scripts adds to its LoRA files."""
    values: dict[str, Any] = {
        "ss_model_type": args.model_type, "ss_apply_t5_attn_mask": bool(args.apply_t5_attn_mask),
        "ss_weighting_scheme": args.weighting_scheme, "ss_logit_mean": args.logit_mean,
        "ss_logit_std": args.logit_std, "ss_mode_scale": args.mode_scale,
        "ss_guidance_scale": resolved_guidance(args, family), "ss_timestep_sampling": args.timestep_sampling,
        "ss_sigmoid_scale": args.sigmoid_scale, "ss_model_prediction_type": args.model_prediction_type,
        "ss_discrete_flow_shift": args.discrete_flow_shift,
    }
    return {k: str(v) for k, v in values.items()}
