"""The memory options of the transformer families (``--fp8_base``, ``--fp8_base_unet``, ``--blocks_to_swap``,
``--cpu_offload_checkpointing``), applied to loaded models without knowing the family: the family only names
its blocks (``FamilySpec.swappable_blocks``). See ``library/models/fp8.py`` and ``block_swap.py``."""

from __future__ import annotations

import argparse
from typing import Any, Callable

import torch

from library.models.fp8 import move_keeping_fp8, to_fp8
from library.training.block_swap import BlockSwap

GPU_ONLY = ("blocks_to_swap", "cpu_offload_checkpointing")


def add_memory_arguments(group: Any, *, swap_help: str) -> None:
    """``--fp8_base``, ``--fp8_base_unet``, ``--blocks_to_swap`` (``swap_help`` says which blocks the family
    swaps) and ``--cpu_offload_checkpointing``, for the transformer families."""
    group.add_argument("--fp8_base", action="store_true",
                       help="store the frozen transformer's and text encoders' Linear weights in float8_e4m3fn, "
                            "compute in the --mixed_precision dtype")
    group.add_argument("--fp8_base_unet", action="store_true", help="float8 for the transformer only")
    group.add_argument("--blocks_to_swap", type=int, default=None,
                       help=f"keep this many transformer blocks in host memory and stream them to the GPU when they "
                            f"run ({swap_help}; CUDA, needs --gradient_checkpointing)")
    group.add_argument("--cpu_offload_checkpointing", action="store_true",
                       help="keep the checkpointed blocks' inputs in host memory until the backward pass (CUDA; "
                            "implies gradient checkpointing)")


def last_blocks_problems(count: int, depth: int, what: str) -> list[str]:
    """sd-scripts' limit for families that swap the last ``count`` of ``depth`` blocks (SD3's joint blocks,
    Lumina's main layers): at most ``depth - 2``."""
    if count > max(depth - 2, 0):
        noun = what if depth != 1 else what.removesuffix("s")
        return [f"--blocks_to_swap {count}: this model has {depth} {noun}, and at most {max(depth - 2, 0)} of them "
                "can be swapped (two stay on the GPU, as in sd-scripts); give a smaller number"]
    return []


def memory_option_problems(args: argparse.Namespace, *, cuda: bool, trains_denoiser: bool) -> list[str]:
    """Problems with the memory options, from the flags alone."""
    problems = []
    swap = getattr(args, "blocks_to_swap", None) or 0
    offload = bool(getattr(args, "cpu_offload_checkpointing", False))
    if not cuda:
        for name in GPU_ONLY:
            if getattr(args, name, None) not in (None, False, 0):
                problems.append(f"--{name} moves weights or activations between the GPU and host memory, and this "
                                "machine has no CUDA device (the model already lives in host memory); remove it")
    if swap < 0:
        problems.append(f"--blocks_to_swap must not be negative, got {swap}")
    if swap and offload:
        problems.append("--blocks_to_swap cannot be combined with --cpu_offload_checkpointing (as in sd-scripts); "
                        "keep one of them")
    if swap and not args.gradient_checkpointing:
        problems.append("--blocks_to_swap needs --gradient_checkpointing: a swapped block leaves the GPU right after "
                        "it runs and the backward pass runs it again; add --gradient_checkpointing")
    if trains_denoiser and (getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False)):
        problems.append("--fp8_base / --fp8_base_unet store frozen weights in float8, but this script trains the "
                        "transformer itself; remove the option (use --full_bf16 to halve the weights' memory)")
    if trains_denoiser and swap and not (getattr(args, "fused_backward_pass", False)
                                         or getattr(args, "blockwise_fused_optimizers", False)):
        problems.append("--blocks_to_swap with full fine-tuning needs --fused_backward_pass or "
                        "--blockwise_fused_optimizers: each block must be updated while it is on the GPU")
    if trains_denoiser and swap and (getattr(args, "ema_decay", None) or getattr(args, "ema_sigma_rel", None)):
        problems.append("--blocks_to_swap cannot be combined with EMA (--ema_decay / --ema_sigma_rel): the averaged "
                        "weights would need every block on the GPU at each step")
    return problems


def apply_fp8_base(models: Any, args: argparse.Namespace, *, frozen_text_encoders: bool) -> list[str]:
    """``--fp8_base``: the denoiser's and the frozen text encoders' Linear weights in float8;
    ``--fp8_base_unet``: the denoiser's only. Call before a LoRA wraps any layer. Returns what was converted."""
    done = []
    if getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False):
        done.append(f"transformer ({to_fp8(models.unet)} Linear layers)")
        if getattr(args, "fp8_base", False) and not getattr(args, "fp8_base_unet", False) and frozen_text_encoders:
            for i, te in enumerate(models.text_encoders):
                done.append(f"text encoder {i + 1} ({to_fp8(te)} Linear layers)")
    return done


def place_denoiser(models: Any, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> BlockSwap | None:
    """Move the denoiser to ``device`` in ``dtype`` (float8 weights stay float8); with ``--blocks_to_swap`` the
    family's swapped blocks stay in host memory, hooked to come in when they run."""
    swap = getattr(args, "blocks_to_swap", None) or 0
    if not swap:
        move_keeping_fp8(models.unet, device, dtype)
        return None
    blocks, swapped = models.family.spec.swappable_blocks(models.unet, swap)
    checkpointing = bool(args.gradient_checkpointing)
    block_swap = BlockSwap(blocks, swapped, device, checkpointing=checkpointing)
    block_swap.place(models.unet, dtype)
    return block_swap


def offloading_checkpoint(device: torch.device) -> Callable[..., Any]:
    """A ``gradient_checkpointing_func`` for diffusers models (``--cpu_offload_checkpointing``): each block's
    inputs, the only activations a checkpointed block keeps, wait for the backward pass in host memory."""
    from torch.utils.checkpoint import checkpoint

    def run(module: Callable[..., Any], *args: Any) -> Any:
        def on_device(*host_args: Any) -> Any:
            return module(*[a.to(device, non_blocking=True) if isinstance(a, torch.Tensor) else a
                            for a in host_args])

        host_args = [a.to("cpu") if isinstance(a, torch.Tensor) else a for a in args]
        return checkpoint(on_device, *host_args, use_reentrant=False)

    return run


def enable_checkpointing(denoiser: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> None:
    """``--gradient_checkpointing``, with the block inputs in host memory under ``--cpu_offload_checkpointing``."""
    if getattr(args, "cpu_offload_checkpointing", False):
        denoiser.enable_gradient_checkpointing(offloading_checkpoint(device))
    else:
        denoiser.enable_gradient_checkpointing()


def optimizer_state_to(optimizer: Any, device: torch.device) -> None:
    """Put a restored optimizer state on ``device``: torch places it beside each parameter, and a swapped block's
    parameters wait in host memory when the state is loaded (``--resume`` with ``--blocks_to_swap``)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                state[key] = value.to(device)
