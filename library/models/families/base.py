"""What a model family is: frozen facts, a training objective, and the behaviour behind the seam.

A :class:`ModelFamily` is resolved once per run (``library.models.families.resolve_family``) from the
checkpoint and the flags, before any model loads, and passed everywhere; its ``spec`` (a
:class:`FamilySpec`) owns what differs between architectures: loading and saving the components, text
conditioning, the denoiser's forward call and the kohya names of LoRA modules. The :class:`Objective`
(what the denoiser predicts) is a second axis: SD1.x can be trained with epsilon or v prediction, and
flow matching (SD3, FLUX.1, Lumina) is one more objective, not one more family.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Collection, Mapping

import torch

Conditioning = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """What the denoiser learns to predict. ``name`` is the diffusers ``prediction_type``."""

    name: str

    @property
    def prediction_type(self) -> str:
        return self.name

    @property
    def is_v_prediction(self) -> bool:
        return self.name == "v_prediction"

    @property
    def is_flow_matching(self) -> bool:
        """Rectified flow (``library.training.flow_matching``): SD3, FLUX.1, Lumina."""
        return self.name == "flow_matching"

    @property
    def modelspec_prediction_type(self) -> str:
        """``modelspec.prediction_type``: ``epsilon`` or ``v``."""
        return "v" if self.is_v_prediction else self.name


EPSILON = Objective("epsilon")
V_PREDICTION = Objective("v_prediction")
FLOW_MATCHING = Objective("flow_matching")


def objective_for(v_parameterization: bool) -> Objective:
    """The DDPM objective of ``--v_parameterization``."""
    return V_PREDICTION if v_parameterization else EPSILON


@dataclass(frozen=True)
class LoRABlockLayout:
    """How a family's denoiser splits into blocks for ``block_dims`` / ``down_lr_weight`` style network args,
    numbered as sd-scripts does: [the embeddings,] ``input_blocks`` down blocks, ``mid_blocks`` middle parts,
    as many up blocks[, the output layers] (``ends``: the bracketed slots, SDXL). ``sgm_names``: the LoRA
    names follow the original (SGM/LDM) UNet (``input_blocks_4_1_...``), not diffusers' (``down_blocks_...``)."""

    input_blocks: int
    mid_blocks: int = 1
    ends: bool = False
    sgm_names: bool = False
    name: str = "SD1/2"

    @property
    def total(self) -> int:
        return self.input_blocks * 2 + self.mid_blocks + (2 if self.ends else 0)

    def describe(self) -> str:
        mid = "the mid block" if self.mid_blocks == 1 else f"{self.mid_blocks} middle-block parts"
        parts = f"{self.input_blocks} down blocks, {mid}, {self.input_blocks} up blocks"
        return f"the embeddings, {parts}, the output layers" if self.ends else parts


SD_LORA_BLOCKS = LoRABlockLayout(12)
SDXL_LORA_BLOCKS = LoRABlockLayout(9, mid_blocks=3, ends=True, sgm_names=True, name="SDXL")


@dataclass(frozen=True)
class LatentFlag:
    """``finetune/prepare_buckets_latents.py``'s flag that names a family for a VAE file given alone (whose
    header cannot tell, e.g. FLUX.1 and Lumina share one AE): the option, what the family is called in
    messages, and the option's help."""

    option: str
    title: str
    help: str

    @property
    def dest(self) -> str:
        """The argparse attribute of :attr:`option`."""
        return self.option.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class ModelFamily:
    """The frozen facts of one architecture trained with one objective (see the module docstring)."""

    name: str
    objective: Objective
    latent_scale: float
    bucket_step: int
    default_resolution: int
    base_model_version: str
    modelspec_architecture: str
    spec_name: str
    scheduler_config: Mapping[str, Any] = field(default_factory=dict, compare=False)
    latent_shift: float = 0.0
    vae_factor: int = 8
    cache_suffix: str = ""
    ss_v2: bool = False
    lora_blocks: LoRABlockLayout = SD_LORA_BLOCKS
    vae_half_safe: bool = True  # False: the VAE overflows in fp16 and stays float32 under fp16 mixed precision
    #: the largest image side the loaded denoiser's fixed position table covers (None: no limit); read from the
    #: checkpoint, so families of one variant with different tables still compare equal
    max_image_side: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheduler_config", MappingProxyType(dict(self.scheduler_config)))

    @property
    def prediction_type(self) -> str:
        """The diffusers scheduler ``prediction_type`` this family trains with."""
        return self.objective.prediction_type

    @property
    def spec(self) -> "FamilySpec":
        """The behaviour of this family (registry lookup)."""
        from library.models.families.registry import family_spec

        return family_spec(self.spec_name)

    def plan_line(self) -> str:
        """How the dataset plan names this family: name, objective, default resolution, bucket step, VAE factor."""
        objective = ("flow matching" if self.objective.is_flow_matching
                     else f"{self.objective.modelspec_prediction_type} prediction")
        r = self.default_resolution
        return (f"model family: {self.name} ({objective}; default resolution {r}x{r}, bucket step {self.bucket_step} "
                f"px, latents 1/{self.vae_factor} of the image size)")

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents to the denoiser's scale: ``(latents - shift) * scale``."""
        if self.latent_shift:
            latents = latents - self.latent_shift
        return latents * self.latent_scale


class FamilySpec(ABC):
    """The behaviour of a family. One stateless instance per family kind lives in the registry."""

    name: str = ""
    #: the scripts that train this family, for messages that name the right one
    scripts: tuple[str, ...] = ()
    #: whether :meth:`load` takes ``dtype=None`` (weights as stored; the caller casts each model when it is
    #: needed, so a float16 checkpoint is never held in float32 all at once)
    loads_stored_dtype: bool = False
    #: the block numbering of ``block_dims`` / ``down_lr_weight`` style network args (as the family's
    #: ``ModelFamily.lora_blocks``; here for networks, which see only the loaded denoiser)
    lora_blocks: LoRABlockLayout = SD_LORA_BLOCKS
    #: the flag of ``prepare_buckets_latents.py`` naming this family for a VAE file given alone (None: its
    #: latents are made only from its own checkpoints or folders, or it is the default family of a VAE)
    latent_flag: LatentFlag | None = None
    #: the latent channels of the family's VAE (a VAE file given with :attr:`latent_flag` is checked against it)
    latent_channels: int = 4
    #: family-specific sample prompt keys its sampler reads (``sampling.FAMILY_SAMPLE_KEYS``); the others are
    #: named as ignored when the prompt file sets them
    sample_prompt_keys: frozenset[str] = frozenset()

    @abstractmethod
    def recognises_file(self, keys: Collection[str]) -> bool:
        """Whether a single file with these tensor names (header only) belongs to this family."""

    @abstractmethod
    def recognises_folder(self, folder: Path) -> bool:
        """Whether a diffusers model folder belongs to this family."""

    @abstractmethod
    def family(self, args: argparse.Namespace, source: Path, keys: Collection[str] | None) -> ModelFamily:
        """The family for the flags and the checkpoint (``keys`` of a single file, None for a folder);
        a :class:`library.errors.UserError` when they disagree."""

    @abstractmethod
    def load(self, args: argparse.Namespace, family: ModelFamily, *, device: Any,
             dtype: torch.dtype | None) -> Any:
        """The model's components (``denoiser``, ``vae``, ``text_encoders``, ``tokenizers``); ``dtype`` None
        (only when :attr:`loads_stored_dtype`) keeps the stored dtypes."""

    def save(self, path: Path, models: Any, *, fmt: str, dtype: torch.dtype | None, metadata: dict[str, str] | None,
             epoch: int, global_step: int) -> Path:
        """Write the whole model (its single-file layout, or a diffusers folder) atomically; a family without
        full-weight training says so."""
        from library.errors import UserError

        raise UserError(f"saving whole {self.name} models is not supported; train a LoRA for this family instead")

    # ---- the LoRA tools (merge into a checkpoint, extract from two; library/lora_tools)

    #: checkpoint formats :meth:`save_for_lora` writes (``safetensors``, ``ckpt``, ``diffusers_safetensors``);
    #: empty: the LoRA tools cannot merge into this family's checkpoints (refused before anything loads)
    lora_save_formats: tuple[str, ...] = ()

    def lora_family(self, args: argparse.Namespace, source: Path, keys: Collection[str] | None) -> ModelFamily:
        """The family of a checkpoint the LoRA tools read (by default :meth:`family`; a family whose training
        needs more files than the checkpoint, like FLUX's text encoders, reads it from the checkpoint alone)."""
        return self.family(args, source, keys)

    def load_for_lora(self, args: argparse.Namespace, family: ModelFamily, *, dtype: torch.dtype) -> Any:
        """The model the LoRA tools change or compare, on the CPU (by default everything :meth:`load` loads)."""
        return self.load(args, family, device="cpu", dtype=dtype)

    def save_for_lora(self, path: Path, models: Any, *, fmt: str, dtype: torch.dtype | None,
                      metadata: dict[str, str] | None) -> Path:
        """Write a model loaded by :meth:`load_for_lora` (by default :meth:`save`)."""
        return self.save(path, models, fmt=fmt, dtype=dtype, metadata=metadata, epoch=0, global_step=0)

    def lora_targets(self, models: Any, conv_blocks: bool) -> dict[str, tuple[torch.nn.Module, ...]]:
        """Every module a kohya LoRA file can change, by kohya module name. A LoRA over a fused layer that the
        compute model splits (FLUX's ``qkv``) maps to its parts in row order: their weights stacked on dim 0 are
        the fused weight. ``conv_blocks`` includes the LoCon 3x3 convs. By default: ``networks.lora``'s targets
        (CLIP text encoders and :meth:`lora_denoiser_name` of the denoiser's modules)."""
        from networks.lora import find_target_modules

        found = find_target_modules(models.text_encoders, models.denoiser, scan_conv_blocks=conv_blocks)
        return {t.lora_name: (t.module,) for t in found}

    # ---- the latent cache made ahead of training (finetune/prepare_buckets_latents.py)

    def latent_family(self, source: Path, args: argparse.Namespace, *, recognised: bool) -> ModelFamily:
        """The family whose training reads latents made from ``source``: a checkpoint or model folder this spec
        recognises (``recognised``), else a VAE given alone with :attr:`latent_flag` (or, for the default family,
        without one); a :class:`library.errors.UserError` when ``source`` holds no VAE of this family."""
        from library.errors import UserError

        raise UserError(f"{source}: prepare_buckets_latents.py does not make latents for {self.name} models")

    def load_latent_vae(self, source: Path, family: ModelFamily) -> torch.nn.Module:
        """The VAE in ``source`` that makes the latent cache, float32 on the CPU, loaded as training loads it
        (so that its cache key is training's). By default ``--vae``'s loader: a VAE file or folder, a single
        file with ``first_stage_model.*``, or a model folder with ``vae/``."""
        from library.models.loading import load_vae

        return load_vae(str(source), family, dtype=torch.float32, device="cpu")

    def load_tokenizers(self, family: ModelFamily, *, model_dir: Path | None, cache_dir: str | None) -> list[Any]:
        """The tokenizers of the text encoders, found without loading the model (textual inversion checks new
        tokens against them before any model loads); empty when they are found only while the model loads."""
        return []

    @abstractmethod
    def text_encoding(self, models: Any, args: argparse.Namespace) -> Any:
        """The object that tokenizes and encodes captions for this family's text encoders."""

    @abstractmethod
    def conditioning(self, text: Any, batch: Mapping[str, Any], device: torch.device) -> Conditioning:
        """The denoiser's conditioning for a batch, from the text conditioning's output ``text``."""

    @abstractmethod
    def forward(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning, dtype: torch.dtype) -> torch.Tensor:
        """The denoiser's prediction for ``noisy`` latents at ``timesteps``."""

    @abstractmethod
    def owns_denoiser(self, denoiser: torch.nn.Module) -> bool:
        """Whether this loaded denoiser is of this family (LoRA networks ask, through the kohya interface)."""

    @abstractmethod
    def lora_denoiser_name(self, denoiser: torch.nn.Module, module_path: str) -> str:
        """The kohya LoRA name body (without ``lora_unet_``) of the ``denoiser`` module at ``module_path``."""

    def dataset_problems(self, family: ModelFamily, args: argparse.Namespace, params: Any) -> list[str]:
        """What the datasets (``DatasetGroupParams``) ask that this model cannot do, found before it loads."""
        return []

    def swappable_blocks(self, denoiser: torch.nn.Module, count: int) -> tuple[list[torch.nn.Module], list[int]]:
        """``--blocks_to_swap count``: the denoiser's blocks in execution order and the indices of those that
        live in host memory (``library.training.block_swap``); a family without blocks to swap says so."""
        from library.errors import UserError

        raise UserError(f"--blocks_to_swap is not supported for {self.name} models")

    def set_attention(self, models: Any, xformers: bool) -> str:
        """Choose the attention kernels of the denoiser and VAE; returns their name for the log. The default
        suits diffusers' generic ``Attention`` modules (SD UNets and VAEs): SDPA, or xformers when asked."""
        if xformers:
            models.denoiser.enable_xformers_memory_efficient_attention()
            models.vae.enable_xformers_memory_efficient_attention()
            return "xformers"
        from diffusers.models.attention_processor import AttnProcessor2_0

        models.denoiser.set_attn_processor(AttnProcessor2_0())
        models.vae.set_attn_processor(AttnProcessor2_0())
        return "sdpa"


class StoredTensorLoRATools:
    """The LoRA tools' save and target hooks of a family whose checkpoints they change as the single file's stored
    tensors (``library/lora_tools/stored.py``): the loaded object writes itself and names its weight slots. Listed
    before :class:`FamilySpec` in a spec's bases."""

    lora_save_formats: tuple[str, ...] = ("safetensors",)

    def save_for_lora(self, path: Path, models: Any, *, fmt: str, dtype: torch.dtype | None,
                      metadata: dict[str, str] | None) -> Path:
        models.save(path, dtype, metadata)
        return path

    def lora_targets(self, models: Any, conv_blocks: bool) -> dict[str, tuple[torch.nn.Module, ...]]:
        return models.targets()

