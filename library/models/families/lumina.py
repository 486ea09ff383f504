"""Lumina Image 2.0: a flow-matching Next-DiT, Gemma2 (hidden states + mask), the 16-channel FLUX AE.

Models come as the files people download (``--pretrained_model_name_or_path`` the Next-DiT single file,
``--gemma2``, ``--ae``) or as a diffusers ``Lumina2Pipeline`` folder. The compute model is diffusers'
``Lumina2Transformer2DModel``. Lumina runs time the other way round: the model gets ``t = 1 - sigma`` and
predicts ``x0 - noise`` (sd-scripts: ``t = 1 - timesteps / 1000``, target ``latents - noise``); ``forward``
returns the negated output, the velocity ``noise - x0`` of the shared flow-matching objective.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Collection, Mapping

import torch

from library.errors import UserError
from library.models.families.base import (FLOW_MATCHING, Conditioning, FamilySpec, LatentFlag, ModelFamily,
                                          StoredTensorLoRATools)
from library.models.families.flux import FLUX_LATENT_SCALE, FLUX_LATENT_SHIFT, load_latent_ae
from library.models.lumina.conversion import layout_of


def lumina_family() -> ModelFamily:
    """Lumina Image 2.0 (the 2B Next-DiT)."""
    return ModelFamily(
        name="lumina2", objective=FLOW_MATCHING, latent_scale=FLUX_LATENT_SCALE, latent_shift=FLUX_LATENT_SHIFT,
        bucket_step=16, default_resolution=1024, base_model_version="lumina2", modelspec_architecture="lumina-2",
        spec_name="lumina", cache_suffix="_lumina", scheduler_config={"shift": 6.0},
    )


class LuminaSpec(StoredTensorLoRATools, FamilySpec):
    """Lumina Image 2.0 behind the family seam."""

    name = "lumina"
    scripts = ("lumina_train_network.py", "lumina_train.py")
    latent_channels = 16
    latent_flag = LatentFlag("--lumina", "Lumina 2", "the model is the FLUX AE (ae.safetensors) that Lumina 2 "
                             "uses: name the latent files for Lumina training (a diffusers Lumina2 folder is "
                             "recognised without it)")
    sample_prompt_keys = frozenset({"cfg_trunc_ratio", "renorm_cfg"})

    def recognises_file(self, keys: Collection[str]) -> bool:
        return layout_of(keys) is not None

    def recognises_folder(self, folder: Path) -> bool:
        index = folder / "model_index.json"
        return index.is_file() and "Lumina2" in index.read_text(encoding="utf-8", errors="replace")

    def family(self, args: argparse.Namespace, source: Path, keys: Collection[str] | None) -> ModelFamily:
        from library.models.lumina.loading import component_problems, describe_file, main_layer_count
        from library.training.memory import last_blocks_problems

        if not source.is_dir():
            if keys is None:
                raise UserError(f"{source}: Lumina models are read from .safetensors files or diffusers folders")
            if layout_of(keys) is None:
                raise UserError(f"{source}: this file is {describe_file(keys)}, not a Lumina 2 transformer; give "
                                "--pretrained_model_name_or_path the Lumina model (lumina_2_model_bf16.safetensors "
                                "or a diffusers Lumina2 folder)")
        problems = component_problems(args, source)
        swap = getattr(args, "blocks_to_swap", None) or 0
        if swap:
            problems += last_blocks_problems(swap, main_layer_count(source, keys), "main layers")
        if problems:
            raise UserError.from_problems("Lumina model files", problems)
        return lumina_family()

    def latent_family(self, source: Path, args: argparse.Namespace, *, recognised: bool) -> ModelFamily:
        if recognised and source.is_file():
            raise UserError(f"{source}: this is the Lumina 2 transformer; the latents are made by the FLUX AE: give "
                            "the AE file (ae.safetensors, lumina_train.py's --ae) and --lumina")
        return lumina_family()

    def load_latent_vae(self, source: Path, family: ModelFamily) -> torch.nn.Module:
        return load_latent_ae(source, family)

    def load(self, args: argparse.Namespace, family: ModelFamily, *, device: Any, dtype: torch.dtype) -> Any:
        from library.models.lumina.loading import load_lumina_models

        return load_lumina_models(args, family, device=device)

    def save(self, path: Path, models: Any, *, fmt: str, dtype: torch.dtype | None, metadata: dict[str, str] | None,
             epoch: int, global_step: int) -> Path:
        from library.models.lumina.saving import save_lumina_transformer

        return save_lumina_transformer(path, models.unet, dtype=dtype, metadata=metadata)

    def text_encoding(self, models: Any, args: argparse.Namespace) -> Any:
        from library.models.lumina.text import LuminaTextEncoding

        return LuminaTextEncoding.from_args(models, args)

    def conditioning(self, text: Any, batch: Mapping[str, Any], device: torch.device) -> Conditioning:
        return {k: v.to(device) for k, v in text.items()}

    def forward(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning, dtype: torch.dtype) -> torch.Tensor:
        """``timesteps`` are ``1000 * sigma``; the output is the velocity ``noise - x0``."""
        out = denoiser(hidden_states=noisy.to(dtype), timestep=(1 - timesteps.float() / 1000).to(dtype),
                       encoder_hidden_states=cond["gemma2_hidden"].to(dtype),
                       encoder_attention_mask=cond["gemma2_mask"].bool()).sample
        return -out

    def swappable_blocks(self, denoiser: torch.nn.Module, count: int) -> tuple[list[torch.nn.Module], list[int]]:
        """sd-scripts' ``--blocks_to_swap N``: the last ``N`` main layers (the refiners, which run first, stay on the
        device; checked against the file header, at most the number of layers minus 2)."""
        layers = list(denoiser.layers)
        return layers, list(range(len(layers) - count, len(layers)))

    def set_attention(self, models: Any, xformers: bool) -> str:
        """SDPA (the Lumina processors already use it) for the transformer and the AE; ``--use_flash_attn`` is
        applied by the recipe (it needs the option)."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        models.vae.set_attn_processor(AttnProcessor2_0())
        return "sdpa"

    def owns_denoiser(self, denoiser: torch.nn.Module) -> bool:
        return type(denoiser).__name__ == "Lumina2Transformer2DModel"

    def lora_denoiser_name(self, denoiser: torch.nn.Module, module_path: str) -> str:
        return module_path.replace(".", "_")  # networks.lora_lumina names the Next-DiT modules itself

    # ---- the LoRA tools: the single file's tensors as stored (library/models/lumina/lora_checkpoint.py)
    def lora_family(self, args: argparse.Namespace, source: Path, keys: Collection[str] | None) -> ModelFamily:
        from library.models.lumina.lora_checkpoint import lumina_lora_family

        return lumina_lora_family(source, keys)

    def load_for_lora(self, args: argparse.Namespace, family: ModelFamily, *, dtype: torch.dtype) -> Any:
        from library.models.lumina.lora_checkpoint import read_lumina_for_lora

        return read_lumina_for_lora(args.pretrained_model_name_or_path, dtype)

