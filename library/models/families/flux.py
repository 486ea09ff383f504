"""FLUX.1 dev / schnell: a flow-matching transformer, CLIP-L (pooled) + T5 (sequence), a 16-channel AE.

Models come as the files people download, each given separately as in sd-scripts
(``--pretrained_model_name_or_path`` the BFL single file, ``--clip_l``, ``--t5xxl``, ``--ae``), or as a
diffusers ``FluxPipeline`` folder. dev and schnell are told apart by the guidance embedding. The compute
model is diffusers' ``FluxTransformer2DModel`` (latents packed 2x2 into 64-channel tokens).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Collection, Mapping

import torch

from library.errors import UserError
from library.models.families.base import FLOW_MATCHING, Conditioning, FamilySpec, LatentFlag, ModelFamily
from library.models.flux.conversion import COMFY_PREFIX, layout_of, read_architecture

FLUX_LATENT_SCALE = 0.3611
FLUX_LATENT_SHIFT = 0.1159


def flux_family(variant: str) -> ModelFamily:
    """FLUX.1 ``dev`` or ``schnell``."""
    return ModelFamily(
        name=f"flux1-{variant}", objective=FLOW_MATCHING, latent_scale=FLUX_LATENT_SCALE,
        latent_shift=FLUX_LATENT_SHIFT, bucket_step=16, default_resolution=1024, base_model_version="flux1",
        modelspec_architecture=f"flux-1-{variant}", spec_name="flux", cache_suffix="_flux",
        scheduler_config={"shift": 3.0},
    )


def is_dev(family: ModelFamily) -> bool:
    return family.name == "flux1-dev"


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C] (2x2 patches, FLUX's token order)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for a latent of size ``h`` x ``w``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Position ids [(h/2)(w/2), 3] of the packed latent tokens (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


def _strip(keys: Collection[str]) -> set[str]:
    return {k[len(COMFY_PREFIX):] if k.startswith(COMFY_PREFIX) else k for k in keys}


def swap_split(count: int) -> tuple[int, int]:
    """``--blocks_to_swap N`` as (double blocks, single blocks) swapped, as sd-scripts counts them."""
    return count // 2, 2 * (count - count // 2)


def swap_problems(count: int, n_double: int, n_single: int) -> list[str]:
    """``--blocks_to_swap`` asking for more blocks than the model has (FLUX.1's 19 double and 38 single blocks
    allow up to 38)."""
    n, m = swap_split(count)
    if n > n_double or m > n_single:
        limit = max(k for k in range(count) if swap_split(k)[0] <= n_double and swap_split(k)[1] <= n_single)
        return [f"--blocks_to_swap {count} swaps {n} double and {m} single blocks (as sd-scripts counts them), but "
                f"this model has {n_double} double and {n_single} single blocks; use at most {limit}"]
    return []


def block_count(keys: Collection[str], pattern: str) -> int:
    """How many distinct block indices ``pattern`` (one group) finds among ``keys``."""
    import re

    found = {m.group(1) for m in map(re.compile(pattern).search, keys) if m}
    return len(found)


def load_latent_ae(source: Path, family: ModelFamily) -> torch.nn.Module:
    """The 16-channel AE that makes FLUX.1's and Lumina's latents: ``ae.safetensors`` as ``--ae`` loads it, or a
    diffusers folder's ``vae/`` (float32, on the CPU)."""
    if source.is_dir():
        from library.models.loading import load_vae

        return load_vae(str(source), family, dtype=torch.float32, device="cpu")
    from library.models.flux.loading import load_ae

    return load_ae(str(source), torch.float32)


class FluxSpec(FamilySpec):
    """FLUX.1 behind the family seam."""

    name = "flux"
    scripts = ("flux_train_network.py", "flux_train.py")
    latent_channels = 16
    latent_flag = LatentFlag("--flux", "FLUX.1", "the model is FLUX.1's 16-channel AE (ae.safetensors): name the "
                             "latent files for FLUX training (a diffusers FLUX folder is recognised without it)")

    def recognises_file(self, keys: Collection[str]) -> bool:
        return layout_of(keys) is not None

    def recognises_folder(self, folder: Path) -> bool:
        return (folder / "transformer" / "config.json").is_file() and (folder / "text_encoder_2").is_dir()

    def family(self, args: argparse.Namespace, source: Path, keys: Collection[str] | None) -> ModelFamily:
        from library.models.flux.arguments import flux_family_problems
        from library.models.flux.loading import component_problems

        family = self._variant(source, keys)
        problems = component_problems(args, source) + flux_family_problems(args, family)
        problems += swap_problems(getattr(args, "blocks_to_swap", None) or 0, *self._depths(source, keys))
        if problems:
            raise UserError.from_problems("FLUX.1 model files", problems)
        return family

    def _variant(self, source: Path, keys: Collection[str] | None) -> ModelFamily:
        if source.is_dir():
            config = json.loads((source / "transformer" / "config.json").read_text(encoding="utf-8"))
            return flux_family("dev" if config.get("guidance_embeds") else "schnell")
        if keys is None:
            raise UserError(f"{source}: FLUX models are read from .safetensors files or diffusers folders")
        if layout_of(keys) is None:
            from library.models.flux.loading import describe_file

            raise UserError(f"{source}: this file is {describe_file(keys)}, not a FLUX.1 transformer; give "
                            "--pretrained_model_name_or_path the FLUX model (flux1-dev.safetensors or a diffusers "
                            "FLUX folder)")
        if layout_of(keys) == "diffusers":
            return flux_family("dev" if any(k.startswith("time_text_embed.guidance_embedder") for k in keys)
                               else "schnell")
        return flux_family("dev" if "guidance_in.in_layer.weight" in _strip(keys) else "schnell")

    @staticmethod
    def _depths(source: Path, keys: Collection[str] | None) -> tuple[int, int]:
        """(double blocks, single blocks) from the folder's config or the file's tensor names."""
        if source.is_dir():
            config = json.loads((source / "transformer" / "config.json").read_text(encoding="utf-8"))
            return int(config["num_layers"]), int(config["num_single_layers"])
        names = _strip(keys or ())
        double = r"double_blocks\.(\d+)\." if layout_of(names) == "bfl" else r"^transformer_blocks\.(\d+)\."
        single = r"single_blocks\.(\d+)\." if layout_of(names) == "bfl" else r"single_transformer_blocks\.(\d+)\."
        return block_count(names, double), block_count(names, single)

    def latent_family(self, source: Path, args: argparse.Namespace, *, recognised: bool) -> ModelFamily:
        if recognised and source.is_file():
            raise UserError(f"{source}: this is the FLUX.1 transformer; the latents are made by the AE: give the AE "
                            "file (ae.safetensors) and --flux")
        return flux_family("dev")

    def load_latent_vae(self, source: Path, family: ModelFamily) -> torch.nn.Module:
        return load_latent_ae(source, family)

    def load(self, args: argparse.Namespace, family: ModelFamily, *, device: Any, dtype: torch.dtype) -> Any:
        from library.models.flux.loading import load_flux_models

        return load_flux_models(args, family, device=device)

    def save(self, path: Path, models: Any, *, fmt: str, dtype: torch.dtype | None, metadata: dict[str, str] | None,
             epoch: int, global_step: int) -> Path:
        """The transformer alone, as one BFL-layout ``.safetensors`` file (what sd-scripts' flux_train.py writes)."""
        from library.models.flux.saving import save_flux_transformer

        if fmt != "safetensors":
            raise UserError(f"FLUX models are saved as one .safetensors file in the BFL layout, not {fmt}")
        return save_flux_transformer(path, models.unet, dtype=dtype, metadata=metadata)

    def text_encoding(self, models: Any, args: argparse.Namespace) -> Any:
        from library.models.flux.text import FluxTextEncoding

        return FluxTextEncoding.from_args(models, args)

    def conditioning(self, text: Any, batch: Mapping[str, Any], device: torch.device) -> Conditioning:
        return {k: v.to(device) for k, v in text.items()}

    def forward(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning, dtype: torch.dtype) -> torch.Tensor:
        """``timesteps`` are ``1000 * sigma``; the output is the velocity in the latents' layout."""
        b, _, h, w = noisy.shape
        device = noisy.device
        mask = cond.get("t5_attn_mask")
        kwargs = {}
        if mask is not None:  # text tokens first, then image tokens (always attended)
            full = torch.cat([mask.bool(), torch.ones(b, (h // 2) * (w // 2), dtype=torch.bool, device=device)], 1)
            kwargs["joint_attention_kwargs"] = {"attention_mask": full[:, None, None, :]}
        out = denoiser(
            hidden_states=pack_latents(noisy).to(dtype), encoder_hidden_states=cond["t5_out"].to(dtype),
            pooled_projections=cond["l_pooled"].to(dtype), timestep=(timesteps.float() / 1000).to(dtype),
            img_ids=image_ids(h, w, device), txt_ids=torch.zeros(cond["t5_out"].shape[1], 3, device=device),
            guidance=cond["guidance"].to(dtype) if denoiser.config.guidance_embeds else None, **kwargs,
        ).sample
        return unpack_latents(out, h, w)

    def swappable_blocks(self, denoiser: torch.nn.Module, count: int) -> tuple[list[torch.nn.Module], list[int]]:
        """sd-scripts' split of ``--blocks_to_swap N``: the last ``N // 2`` double blocks and the last
        ``2 * (N - N // 2)`` single blocks (a double block holds about twice the weights of a single one)."""
        double, single = list(denoiser.transformer_blocks), list(denoiser.single_transformer_blocks)
        n_double, n_single = swap_split(count)
        swapped = [*range(len(double) - n_double, len(double)),
                   *range(len(double) + len(single) - n_single, len(double) + len(single))]
        return double + single, swapped

    def set_attention(self, models: Any, xformers: bool) -> str:
        """diffusers' FLUX attention already runs on SDPA; the AE gets SDPA too."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        models.vae.set_attn_processor(AttnProcessor2_0())
        return "sdpa"

    def owns_denoiser(self, denoiser: torch.nn.Module) -> bool:
        return type(denoiser).__name__ == "FluxTransformer2DModel"

    def lora_denoiser_name(self, denoiser: torch.nn.Module, module_path: str) -> str:
        return module_path.replace(".", "_")  # networks.lora_flux names the BFL modules itself

    # ---- the LoRA tools: the transformer alone (``save`` writes it back as the BFL single file)
    lora_save_formats = ("safetensors",)

    def lora_family(self, args: argparse.Namespace, source: Path, keys: Collection[str] | None) -> ModelFamily:
        return self._variant(source, keys)

    def load_for_lora(self, args: argparse.Namespace, family: ModelFamily, *, dtype: torch.dtype) -> Any:
        from library.models.flux.lora_checkpoint import load_transformer_for_lora

        return load_transformer_for_lora(args, family, dtype)

    def lora_targets(self, models: Any, conv_blocks: bool) -> dict[str, tuple[torch.nn.Module, ...]]:
        from library.models.flux.lora_checkpoint import flux_lora_targets

        return flux_lora_targets(models.text_encoders, models.denoiser)
