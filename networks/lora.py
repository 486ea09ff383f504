"""Kohya-format LoRA and LoCon for diffusers SD1.x/2.x models.

Module names, tensor keys and the math are those of kohya-ss/sd-scripts ``networks.lora``, so the files we write
load in A1111, ComfyUI, diffusers (``load_lora_weights``) and sd-scripts, and their files load here:

- UNet: every ``nn.Linear`` / ``nn.Conv2d`` inside a ``Transformer2DModel`` (attention ``to_q/k/v/out.0``,
  ``proj_in``/``proj_out``, ``ff.net.0.proj``, ``ff.net.2``), named ``lora_unet_<module path with _>``. With
  ``conv_dim`` (LoCon) also ``ResnetBlock2D``/``Downsample2D``/``Upsample2D``: 3x3 convs get the conv rank, their
  Linear and 1x1 children (``time_emb_proj``, ``conv_shortcut``) the linear rank.
- Text encoder: ``q/k/v/out_proj`` and ``fc1/fc2`` of the CLIP attention and MLP blocks, named
  ``lora_te_text_model_encoder_layers_<i>_...`` (``lora_te1_``/``lora_te2_`` with two encoders). transformers 5
  dropped ``text_model.`` from the module paths; the standard names keep it.
- Per module: ``.lora_down.weight`` ``[r, in]`` (conv ``[r, in, kh, kw]``), ``.lora_up.weight`` ``[out, r]``
  (conv ``[out, r, 1, 1]``), ``.alpha`` (0-d); ``y = org(x) + up(down(x)) * multiplier * alpha / r``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from library.models.weights import load_pickle
from networks.lora_options import SHAPE_ARGS, LoRAOptions, block_index, parse_network_kwargs

logger = logging.getLogger(__name__)

UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
PREFIX_UNET = "lora_unet"
PREFIX_TEXT_ENCODER = "lora_te"

# CLIP only (FLUX's T5 is lora_te3_; Lumina's Gemma2 is lora_te_layers_, which has no text_model_ in any spelling)
_RE_TE_WITHOUT_TEXT_MODEL = re.compile(r"^(lora_te[12]?_)(?=encoder_layers_)")


# ----------------------------------------------------------------------------------------------------------------
# names


def standard_key(key: str) -> str:
    """Map text encoder keys written without ``text_model_`` (sd-scripts under transformers 5) to the standard."""
    return _RE_TE_WITHOUT_TEXT_MODEL.sub(r"\1text_model_", key) if key.startswith("lora_te") else key


def _text_encoder_list(text_encoder: nn.Module | Sequence[nn.Module | None] | None) -> list[nn.Module | None]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return list(text_encoder)
    return [text_encoder]


@dataclass(frozen=True)
class TargetModule:
    lora_name: str
    module: nn.Module
    is_unet: bool
    is_3x3: bool


def find_target_modules(
    text_encoders: Sequence[nn.Module | None], unet: nn.Module | None, scan_conv_blocks: bool
) -> list[TargetModule]:
    """All Linear/Conv2d modules that can carry a LoRA, with their kohya names."""
    found: list[TargetModule] = []
    present = [(i, te) for i, te in enumerate(text_encoders) if te is not None]
    for i, te in present:
        prefix = PREFIX_TEXT_ENCODER if len(text_encoders) == 1 else f"{PREFIX_TEXT_ENCODER}{i + 1}"
        for name, module in te.named_modules():
            if type(module).__name__ not in TEXT_ENCODER_TARGETS:
                continue
            path = name if name.startswith("text_model.") else f"text_model.{name}"
            for child_name, child in module.named_modules():
                if isinstance(child, nn.Linear):
                    found.append(TargetModule(f"{prefix}_{path}.{child_name}".replace(".", "_"), child, False, False))
    if unet is not None:
        from library.models.families import spec_for_denoiser

        spec = spec_for_denoiser(unet)  # the family's kohya name map
        targets = UNET_TARGETS + (UNET_CONV_TARGETS if scan_conv_blocks else ())
        for name, module in unet.named_modules():
            if type(module).__name__ not in targets:
                continue
            for child_name, child in module.named_modules():
                if isinstance(child, (nn.Linear, nn.Conv2d)):
                    is_3x3 = isinstance(child, nn.Conv2d) and tuple(child.kernel_size) != (1, 1)
                    lora_name = f"{PREFIX_UNET}_{spec.lora_denoiser_name(unet, f'{name}.{child_name}')}"
                    found.append(TargetModule(lora_name, child, True, is_3x3))
    names = [t.lora_name for t in found]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise RuntimeError("duplicate LoRA module names: " + ", ".join(duplicates))
    return found


# ----------------------------------------------------------------------------------------------------------------
# modules


def lora_delta(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The weight update ``up @ down`` (without scale) in the shape of the original weight."""
    if down.dim() == 2:
        return up @ down
    if down.shape[2:] == (1, 1):
        return (up.flatten(1) @ down.flatten(1)).unsqueeze(2).unsqueeze(3)
    return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)


class LoRAModule(nn.Module):
    """A LoRA beside one Linear/Conv2d. ``apply_to`` wraps the original module's ``forward``; the module itself
    stays in its model (so its name, weights and hooks are untouched)."""

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float | torch.Tensor = 1.0,
        lora_dim: int = 4,
        alpha: float | torch.Tensor | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        if isinstance(org_module, nn.Conv2d):
            self.lora_down = nn.Conv2d(
                org_module.in_channels,
                lora_dim,
                org_module.kernel_size,
                org_module.stride,
                org_module.padding,
                org_module.dilation,
                bias=False,
            )
            self.lora_up = nn.Conv2d(lora_dim, org_module.out_channels, (1, 1), (1, 1), bias=False)
        else:
            self.lora_down = nn.Linear(org_module.in_features, lora_dim, bias=False)
            self.lora_up = nn.Linear(lora_dim, org_module.out_features, bias=False)
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float())
        alpha = float(lora_dim if not alpha else alpha)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / lora_dim
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # kept out of the module tree: the original weights must not appear in our state_dict
        object.__setattr__(self, "org_module", org_module)
        self.org_forward = None
        self.register_load_state_dict_post_hook(LoRAModule._refresh_scale)

    @staticmethod
    def _refresh_scale(module: "LoRAModule", incompatible_keys: Any) -> None:
        module.scale = float(module.alpha.detach().float()) / module.lora_dim

    def apply_to(self) -> None:
        if self.org_forward is not None:
            raise RuntimeError(f"{self.lora_name} is already applied")
        self.org_forward = self.org_module.forward
        self.org_module.forward = self.forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.org_forward(x, *args, **kwargs)
        if self.module_dropout is not None and self.training and torch.rand(1) < self.module_dropout:
            return out
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.dropout is not None and self.training:
            lx = F.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout is not None and self.training:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:
                mask = mask.unsqueeze(1)
            elif lx.dim() == 4:
                mask = mask.unsqueeze(-1).unsqueeze(-1)
            lx = lx * mask
            scale = scale / (1.0 - self.rank_dropout)
        multiplier = self.multiplier
        if isinstance(multiplier, torch.Tensor):  # one multiplier per sample
            lx = self.lora_up(lx)
            multiplier = multiplier.to(lx.device, lx.dtype).view(-1, *([1] * (lx.dim() - 1)))
            return out + (lx * (multiplier * scale)).to(out.dtype)
        # the scale goes into the small up weight, not the output: one elementwise pass over the output fewer,
        # forward and backward
        weight = self.lora_up.weight * (multiplier * scale)
        up = F.conv2d(lx, weight) if isinstance(self.lora_up, nn.Conv2d) else F.linear(lx, weight)
        return out + up.to(out.dtype)

    @torch.no_grad()
    def merge_to(
        self, sd: Mapping[str, torch.Tensor], multiplier: float, dtype: torch.dtype | None, device: Any
    ) -> None:
        """Add ``multiplier * up @ down * alpha / r`` from ``sd`` (keys without the module name) to the weight."""
        weight = self.org_module.weight
        device = weight.device if device is None else device
        down = sd["lora_down.weight"].to(device, torch.float32)
        up = sd["lora_up.weight"].to(device, torch.float32)
        rank = down.shape[0]
        alpha = float(sd["alpha"]) if "alpha" in sd else rank
        merged = weight.to(device, torch.float32) + lora_delta(up, down) * (multiplier * alpha / rank)
        weight.copy_(merged.to(dtype or weight.dtype))


# ----------------------------------------------------------------------------------------------------------------
# files


def load_lora_file(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a LoRA file (``.safetensors``, or a ``.ckpt``/``.pt`` pickle loaded with weights_only)."""
    path = Path(file)
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # corrupt or foreign file: say which one
            raise UserError(f"cannot read LoRA file {path}: {err}") from None
    sd = load_pickle(path)  # weights_only: a pickle that would run code is refused with an explanation
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a LoRA weights file (expected a flat dict of tensors)")
    return sd


def _listing(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _split_by_module(weights_sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights_sd.items():
        name, _, rest = standard_key(key).partition(".")
        modules.setdefault(name, {})[rest] = value
    return modules


# ----------------------------------------------------------------------------------------------------------------
# network


class LoRANetwork(nn.Module):
    """The LoRA modules of a text encoder (or list of them) and a UNet, with the kohya network interface."""

    def __init__(
        self,
        text_encoder: nn.Module | Sequence[nn.Module | None] | None,
        unet: nn.Module | None,
        options: LoRAOptions,
        multiplier: float = 1.0,
    ):
        super().__init__()
        self.options = options
        self.multiplier = multiplier
        self.applied = False
        self.dropped: list[str] = []  # parts left out by apply_to ("text encoder", "UNet")
        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []
        text_encoders = _text_encoder_list(text_encoder)
        for target in find_target_modules(text_encoders, unet, options.scans_conv_blocks):
            rank = options.rank_for(target.lora_name, target.is_unet, target.is_3x3)
            if rank is None:
                continue
            lora = LoRAModule(
                target.lora_name,
                target.module,
                multiplier,
                rank[0],
                rank[1],
                options.dropout,
                options.rank_dropout,
                options.module_dropout,
            )
            self.add_module(target.lora_name, lora)
            (self.unet_loras if target.is_unet else self.text_encoder_loras).append(lora)
        logger.info(
            "LoRA: %d text encoder modules, %d UNet modules", len(self.text_encoder_loras), len(self.unet_loras)
        )

    def all_loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    def set_multiplier(self, multiplier: float | torch.Tensor) -> None:
        """Strength of every module; a Tensor[B] gives one multiplier per sample of the batch."""
        self.multiplier = multiplier
        for lora in self.all_loras():
            lora.multiplier = multiplier

    def apply_to(
        self,
        text_encoder: Any = None,
        unet: Any = None,
        apply_text_encoder: bool = True,
        apply_unet: bool = True,
    ) -> None:
        """Wrap the forward of the original modules. The parts not applied are dropped from the network (and so
        from the saved file): that is how ``--network_train_unet_only`` / ``--network_train_text_encoder_only``
        work. ``text_encoder``/``unet`` are accepted for interface compatibility; the modules found at creation are
        used."""
        if self.applied:
            raise RuntimeError("the LoRA network is already applied")
        parts = (("text encoder", apply_text_encoder, self.text_encoder_loras), ("UNet", apply_unet, self.unet_loras))
        for part, keep, loras in parts:
            if not keep and loras:
                for lora in loras:
                    delattr(self, lora.lora_name)
                loras.clear()
                self.dropped.append(part)
        for lora in self.all_loras():
            lora.apply_to()
        self.applied = True

    def is_mergeable(self) -> bool:
        return True

    def load_weights(self, file: str | os.PathLike) -> Any:
        """Load a LoRA file into this network. Every key must fit: unknown keys, missing modules and shape
        mismatches raise :class:`UserError` naming them. A module without ``alpha`` (old files) gets alpha = rank."""
        weights_sd = {standard_key(k): v for k, v in load_lora_file(file).items()}
        own = self.state_dict()
        unexpected = [k for k in weights_sd if k not in own]
        missing = [k for k in own if k not in weights_sd and not k.endswith(".alpha")]
        mismatched = [
            f"{k}: file {tuple(v.shape)}, network {tuple(own[k].shape)}"
            for k, v in weights_sd.items()
            if k in own and v.shape != own[k].shape
        ]
        problems = []
        if unexpected:
            problems.append(f"{len(unexpected)} keys match no module of this network: {_listing(unexpected)}")
            for part, prefix, flag in (
                ("text encoder", "lora_te", "--network_train_unet_only"),
                ("UNet", "lora_unet", "--network_train_text_encoder_only"),
            ):
                if part in self.dropped and any(k.startswith(prefix) for k in unexpected):
                    problems.append(
                        f"the file has {part} modules but this network trains no {part} ({flag}); "
                        f"drop {flag} to keep training them"
                    )
        if missing:
            problems.append(f"{len(missing)} keys of the network are not in the file: {_listing(missing)}")
        if mismatched:
            problems.append(
                f"{len(mismatched)} shapes differ (use --dim_from_weights or the file's --network_dim/--network_args): "
                + _listing(mismatched, 4)
            )
        dropped_prefixes = tuple({"text encoder": "lora_te", "UNet": "lora_unet"}[part] for part in self.dropped)
        if [k for k in unexpected if not k.startswith(dropped_prefixes)] or missing:
            problems.append(
                "the file has other modules than this network (trained with other --network_args such as conv_dim "
                "or block_dims, or for only the UNet or text encoder): add --dim_from_weights to build the network "
                "from the file"
            )
        if problems:
            raise UserError.from_problems(f"{file} does not fit this LoRA network", problems)
        for key in own:
            if key.endswith(".alpha") and key not in weights_sd:
                weights_sd[key] = torch.tensor(float(own[key.replace(".alpha", ".lora_down.weight")].shape[0]))
        return self.load_state_dict(weights_sd, strict=True)

    def save_weights(
        self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: Mapping[str, str] | None
    ) -> None:
        """Write the weights (cast to ``dtype`` when given) atomically: ``.safetensors`` with ``metadata`` and the
        ``sshs_*`` hashes, anything else (``.ckpt``/``.pt``) as a torch pickle without metadata."""
        from library.io_utils import atomic_save_file
        from library.models.metadata import save_safetensors

        state_dict = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
        if Path(file).suffix == ".safetensors":
            save_safetensors(file, state_dict, metadata)
        else:
            atomic_save_file(file, lambda tmp: torch.save(state_dict, tmp))

    def merge_to(
        self,
        text_encoder: Any = None,
        unet: Any = None,
        weights_sd: Mapping[str, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> None:
        """Add the LoRA to the original weights: ``W += multiplier * up @ down * alpha / r`` (1x1 convs via
        squeeze, 3x3 via conv composition). ``weights_sd`` defaults to this network's own weights; every key must
        belong to a module of this network. The network must not be applied (it would count twice)."""
        if self.applied:
            raise RuntimeError("merge_to on an applied network would add the LoRA twice")
        by_module = _split_by_module(self.state_dict() if weights_sd is None else weights_sd)
        own = {lora.lora_name: lora for lora in self.all_loras()}
        unknown = [name for name in by_module if name not in own]
        incomplete = [n for n, sd in by_module.items() if {"lora_down.weight", "lora_up.weight"} - set(sd)]
        if unknown or incomplete:
            problems = [f"modules not in the model: {_listing(unknown)}"] if unknown else []
            problems += [f"modules without lora_down/lora_up: {_listing(incomplete)}"] if incomplete else []
            raise UserError.from_problems("cannot merge LoRA weights", problems)
        if isinstance(self.multiplier, torch.Tensor):
            raise ValueError("merge_to needs a scalar multiplier")
        for name, sd in by_module.items():
            own[name].merge_to(sd, float(self.multiplier), dtype, device)

    def prepare_optimizer_params(
        self,
        text_encoder_lr: float | Sequence[float] | None,
        unet_lr: float | None,
        default_lr: float | None,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Optimizer parameter groups and their descriptions (for LR logging).

        Text encoder ``i`` uses ``text_encoder_lr[i]`` (the last value for the rest), else ``default_lr``. UNet
        modules are grouped per block when block LR weights are set (``lr = unet_lr * weight``). With LoRA+ the
        ``lora_up`` weights get their own group at ``lr * ratio``. Groups with lr 0 are left out; with no lr at all
        the group has no ``lr`` key (the optimizer's default applies).
        """
        self.requires_grad_(True)
        if isinstance(text_encoder_lr, (list, tuple)):
            te_lrs = list(text_encoder_lr)
        else:
            te_lrs = [] if text_encoder_lr is None else [text_encoder_lr]
        o = self.options
        groups: list[dict[str, Any]] = []
        descriptions: list[str] = []

        def add(loras: list[LoRAModule], lr: float | None, ratio: float | None, description: str) -> None:
            plain = [p for lora in loras for n, p in lora.named_parameters() if ratio is None or "lora_up" not in n]
            plus = [p for lora in loras for n, p in lora.named_parameters() if ratio is not None and "lora_up" in n]
            plus_lr = None if lr is None else lr * (ratio or 1)
            for params, group_lr, suffix in ((plain, lr, ""), (plus, plus_lr, " plus")):
                if not params or group_lr == 0:
                    continue
                groups.append({"params": params} if group_lr is None else {"params": params, "lr": group_lr})
                descriptions.append(description + suffix)

        te_ratio = o.loraplus_text_encoder_lr_ratio or o.loraplus_lr_ratio
        by_prefix: dict[str, list[LoRAModule]] = {}
        for lora in self.text_encoder_loras:
            by_prefix.setdefault(lora.lora_name.split("_text_model_")[0], []).append(lora)
        for i, (prefix, loras) in enumerate(sorted(by_prefix.items())):
            lr = te_lrs[min(i, len(te_lrs) - 1)] if te_lrs else default_lr
            add(loras, lr, te_ratio, "textencoder" if len(by_prefix) == 1 else f"textencoder{i + 1}")

        unet_ratio = o.loraplus_unet_lr_ratio or o.loraplus_lr_ratio
        base_lr = unet_lr if unet_lr is not None else default_lr
        if o.block_lr:
            blocks: dict[int, list[LoRAModule]] = {}
            for lora in self.unet_loras:
                blocks.setdefault(block_index(lora.lora_name, o.layout), []).append(lora)
            for idx in sorted(blocks):
                lr = None if base_lr is None else base_lr * o.lr_weight(idx)
                add(blocks[idx], lr, unet_ratio, f"unet_block{idx}")
        elif self.unet_loras:
            add(self.unet_loras, base_lr, unet_ratio, "unet")
        return groups, descriptions

    def prepare_grad_etc(self, text_encoder: Any, unet: Any) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any, unet: Any) -> None:
        self.train()

    def get_trainable_params(self) -> Iterable[nn.Parameter]:
        return self.parameters()

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: LoRA modules run inside the base model's blocks, which the trainer checkpoints."""

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device: Any) -> tuple[int, float, float]:
        """``--scale_weight_norms``: scale ``up`` and ``down`` of every module whose ``|up @ down * scale|`` exceeds
        ``max_norm_value`` by ``sqrt(max / norm)`` each. Returns (modules scaled, mean norm, max norm) after."""
        keys_scaled = 0
        norms = []
        for lora in self.all_loras():
            down = lora.lora_down.weight
            up = lora.lora_up.weight
            delta = lora_delta(up.to(device, torch.float32), down.to(device, torch.float32)) * lora.scale
            norm = delta.norm().clamp(min=max_norm_value / 2)
            ratio = float(norm.clamp(max=max_norm_value) / norm)
            if ratio != 1:
                keys_scaled += 1
                down.mul_(ratio**0.5)
                up.mul_(ratio**0.5)
            norms.append(float(delta.norm()) * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)


# ----------------------------------------------------------------------------------------------------------------
# module interface used by --network_module


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoder: nn.Module | Sequence[nn.Module | None] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> LoRANetwork:
    """A fresh network (``network_dim`` default 4, ``network_alpha`` default 1); ``kwargs`` are ``--network_args``."""
    options = parse_network_kwargs(kwargs, network_dim, network_alpha, neuron_dropout, layout=_block_layout(unet))
    return LoRANetwork(text_encoder, unet, options, multiplier)


def _block_layout(unet: nn.Module | None) -> Any:
    """The block numbering of ``unet``'s family for block-wise network args (SD1/2's without a UNet)."""
    from library.models.families import spec_for_denoiser
    from library.models.families.base import SD_LORA_BLOCKS

    return SD_LORA_BLOCKS if unet is None else spec_for_denoiser(unet).lora_blocks


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: Any,
    text_encoder: nn.Module | Sequence[nn.Module | None] | None,
    unet: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A network shaped like a LoRA file (ranks and alphas from the file; alpha = rank where a module has none).

    Returns ``(network, weights_sd)`` as the reference does; the weights are not loaded (call ``load_weights`` or
    ``merge_to(..., weights_sd, ...)``). Modules of the file that match nothing in the models raise
    :class:`UserError`. Shape arguments in ``kwargs`` are ignored (the file decides); dropouts, block LR weights
    and LoRA+ ratios apply. ``for_inference`` freezes the network and puts it in eval mode.
    """
    source = str(file) if file is not None else "the given weights"
    weights_sd = load_lora_file(file) if weights_sd is None else dict(weights_sd)
    by_module = _split_by_module(weights_sd)
    modules_dim: dict[str, int] = {}
    modules_alpha: dict[str, float] = {}
    for name, sd in by_module.items():
        if "lora_down.weight" in sd:
            modules_dim[name] = int(sd["lora_down.weight"].shape[0])
            modules_alpha[name] = float(sd["alpha"]) if "alpha" in sd else modules_dim[name]
    if not modules_dim:
        raise UserError(f"{source} has no lora_down weights: it is not a kohya-format LoRA file")
    ignored = [k for k in kwargs if k in SHAPE_ARGS and kwargs[k] is not None]
    if ignored:
        logger.info("network_args %s ignored: ranks come from %s", ", ".join(ignored), source)
    rest = {k: v for k, v in kwargs.items() if k not in SHAPE_ARGS}
    parsed = parse_network_kwargs(rest, layout=_block_layout(unet))
    options = LoRAOptions(
        dropout=parsed.dropout,
        rank_dropout=parsed.rank_dropout,
        module_dropout=parsed.module_dropout,
        down_lr_weight=parsed.down_lr_weight,
        mid_lr_weight=parsed.mid_lr_weight,
        up_lr_weight=parsed.up_lr_weight,
        layout=parsed.layout,
        loraplus_lr_ratio=parsed.loraplus_lr_ratio,
        loraplus_unet_lr_ratio=parsed.loraplus_unet_lr_ratio,
        loraplus_text_encoder_lr_ratio=parsed.loraplus_text_encoder_lr_ratio,
        modules_dim=modules_dim,
        modules_alpha=modules_alpha,
    )
    network = LoRANetwork(text_encoder, unet, options, multiplier)
    unmatched = set(modules_dim) - {lora.lora_name for lora in network.all_loras()}
    if unmatched:
        raise UserError(
            f"{source}: {len(unmatched)} LoRA modules match nothing in this model ({_listing(unmatched)}); "
            "is the file for another model family (SD1/SD2/SDXL)?"
        )
    if for_inference:
        network.requires_grad_(False)
        network.eval()
    return network, {standard_key(k): v for k, v in weights_sd.items()}
