"""Lumina Image 2.0 options (sd-scripts' names) and their checks, all before any model loads."""

from __future__ import annotations

import argparse
from typing import Any

from library.training.flow_matching import FlowDefaults, add_flow_matching_arguments, flow_option_problems

LUMINA_FLOW_DEFAULTS = FlowDefaults(timestep_sampling="shift", discrete_flow_shift=6.0, model_prediction_type="raw")


def add_lumina_arguments(parser: argparse.ArgumentParser) -> None:
    """Model files, text, attention, flow matching, sampling and memory options of the Lumina scripts."""
    from library.training.memory import add_memory_arguments

    g = parser.add_argument_group("Lumina Image 2.0")
    g.add_argument("--gemma2", type=str, default=None,
                   help="Gemma2 text encoder: gemma_2_2b_fp16.safetensors or a transformers folder")
    g.add_argument("--ae", type=str, default=None, help="the FLUX autoencoder file (ae.safetensors)")
    g.add_argument("--gemma2_max_token_length", type=int, default=None,
                   help="Gemma2 tokens per caption, system prompt included (default 256)")
    g.add_argument("--system_prompt", type=str, default="",
                   help="put in front of every caption as '<system prompt> <Prompt Start> <caption>'")
    g.add_argument("--use_flash_attn", action="store_true",
                   help="flash-attn kernels for the transformer when installed and on CUDA (SDPA otherwise)")
    g.add_argument("--use_sage_attn", action="store_true", help="(inference only in sd-scripts; refused here)")
    g.add_argument("--sample_batch_size", type=int, default=None,
                   help="prompts sampled together during training (default --train_batch_size)")
    add_memory_arguments(g, swap_help="the last N of the main layers, at most their number minus 2, as sd-scripts")
    add_flow_matching_arguments(parser, LUMINA_FLOW_DEFAULTS)


def lumina_option_problems(args: argparse.Namespace, *, cuda: bool, trains_denoiser: bool = False) -> list[str]:
    """Every Lumina option problem that can be found from the flags alone (``trains_denoiser``: lumina_train.py)."""
    from library.training.memory import memory_option_problems

    problems = flow_option_problems(args) + memory_option_problems(args, cuda=cuda, trains_denoiser=trains_denoiser)
    for name in ("gemma2_max_token_length", "sample_batch_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            problems.append(f"--{name} must be positive, got {value}")
    for name, why in (("v2", "it selects Stable Diffusion 2.x"), ("clip_skip", "Lumina reads Gemma2's hidden states"),
                      ("max_token_length", "use --gemma2_max_token_length"),
                      ("weighted_captions", "Lumina captions are not weighted"), ("vae", "use --ae"),
                      ("xformers", "use --use_flash_attn, or nothing for PyTorch SDPA"),
                      ("use_sage_attn", "Sage attention has no backward pass; use --use_flash_attn or SDPA")):
        if getattr(args, name, None) not in (None, False):
            problems.append(f"--{name} does not apply to Lumina training ({why}); remove it")
    module = getattr(args, "network_module", None)
    if module is not None and module != "networks.lora_lumina":
        problems.append(f"--network_module {module}: Lumina LoRAs are made by networks.lora_lumina (networks.lora "
                        "finds no Lumina layers); use --network_module networks.lora_lumina")
    return problems


def lumina_ss_metadata(args: argparse.Namespace) -> dict[str, str]:
    """The Lumina ``ss_*`` keys sd-scripts adds to its LoRA files."""
    values: dict[str, Any] = {
        "ss_weighting_scheme": args.weighting_scheme, "ss_logit_mean": args.logit_mean,
        "ss_logit_std": args.logit_std, "ss_mode_scale": args.mode_scale,
        "ss_timestep_sampling": args.timestep_sampling, "ss_sigmoid_scale": args.sigmoid_scale,
        "ss_model_prediction_type": args.model_prediction_type, "ss_discrete_flow_shift": args.discrete_flow_shift,
    }
    return {k: str(v) for k, v in values.items()}
