"""Merge a LoRA adapter into its base model: a standalone transformers folder (weights, config, tokenizer, image
processor, and the stage-2 head when the adapter has one) that loads offline with
``AutoModelForImageTextToText`` and gives the outputs of base + adapter."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from library.cli import ArgumentParser
from library.errors import UserError
from library.io_utils import atomic_save_folder
from library.vlm.head import HEAD_CONFIG, HEAD_WEIGHTS
from library.vlm.loading import apply_adapter, check_adapter_folder, load_vlm, resolve_base_and_adapter

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="vlm_merge_lora_weights.py", description="Merge a VLM LoRA adapter into its base model")
    p.add_argument("--base_model", "--model_local_path", dest="base_model", type=str, default=None,
                   help="base model folder or id (default: the one recorded in the adapter)")
    p.add_argument("--lora_path", "--model_path", dest="lora_path", type=str, required=True,
                   help="adapter folder written by vlm_train.py")
    p.add_argument("--output_path", "--model_save_path", dest="output_path", type=str, required=True,
                   help="folder for the merged model")
    p.add_argument("--save_dtype", choices=tuple(DTYPES), default="float32", help="dtype of the merged weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_path")
    return p


def merge(args: argparse.Namespace) -> Path:
    output = Path(args.output_path)
    if output.exists() and not args.overwrite:
        raise UserError(f"--output_path {output} exists; pass --overwrite to replace it")
    check_adapter_folder(Path(args.lora_path))
    folder, adapter = resolve_base_and_adapter(args.base_model, args.lora_path)
    vlm = load_vlm(folder, dtype=torch.float32, device=torch.device("cpu"), flag="--base_model")
    apply_adapter(vlm, adapter)
    merged = vlm.model.merge_and_unload().to(DTYPES[args.save_dtype])
    leftover = [n for n, _ in merged.named_parameters() if "lora_" in n]
    if leftover:  # pragma: no cover - a PEFT bug, not a user error
        raise RuntimeError(f"LoRA weights left after merging: {leftover[:3]}")

    def write(tmp: Path) -> None:
        merged.save_pretrained(str(tmp))
        vlm.tokenizer.save_pretrained(str(tmp))
        vlm.image_processor.save_pretrained(str(tmp))
        for name in (HEAD_WEIGHTS, HEAD_CONFIG):
            if (adapter / name).is_file():
                shutil.copy2(adapter / name, tmp / name)

    atomic_save_folder(output, write)
    print(f"merged {adapter} into {folder}: {output}")
    return output
