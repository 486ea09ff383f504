"""What the kohya-format LoRAs of the transformer families (FLUX.1, SD3, Lumina) share: a LoRA over fused layers that
diffusers computes as split layers, and the network's parameter groups.

sd-scripts puts its LoRAs on the original layers, where q, k and v (and, in FLUX single blocks, the MLP input)
are one fused ``Linear`` with one shared down-projection. diffusers computes with split layers whose outputs
equal the original model's. :class:`FusedLoRAModule` keeps sd-scripts' parameterisation on the split layers:
one ``lora_down [r, in]`` shared by every part and one ``lora_up [sum(out), r]`` whose row blocks feed each
part, so the file holds the fused shapes and ``W_part += scale * up[rows of part] @ down`` is exactly the fused
update.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Callable, Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from networks.lora import LoRAModule, LoRANetwork, _listing, _split_by_module, load_lora_file, standard_key
from networks.lora_fused_options import FusedLoRAOptions


class FusedLoRAModule(nn.Module):
    """One LoRA over one or more ``Linear`` layers that read the same input (the split parts of a fused layer).

    ``lora_down [r, in]`` is shared; ``lora_up [sum(out_i), r]`` is cut into row blocks, one per part, in order.
    Each part's output becomes ``org_i(x) + up_i(down(x)) * multiplier * alpha / r``. With one part this is a
    plain kohya LoRA. Dropouts are drawn per part call. ``swap_halves`` (one part only) is for a layer whose
    rows are the fused layer's two halves swapped: diffusers keeps SD3's final modulations as (scale, shift)
    where the original layer, and so the file, has (shift, scale).

    ``split`` (FLUX's ``split_qkv=True``): each part gets its own rank-``r`` LoRA, as sd-scripts' split_qkv.
    They are kept as the fused LoRA of rank ``n*r`` they are equal to: part ``i`` uses rows ``i*r:(i+1)*r`` of
    ``lora_down`` and only the matching columns of its ``lora_up`` rows (the rest of ``lora_up`` stays zero:
    block-diagonal), with alpha ``n*alpha`` so that the scale stays ``alpha / r``. The file is therefore a
    plain fused LoRA that every loader applies with the right math.
    """

    def __init__(self, lora_name: str, org_modules: Sequence[nn.Linear], multiplier: float | torch.Tensor = 1.0,
                 lora_dim: int = 4, alpha: float | None = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None, swap_halves: bool = False,
                 split: bool = False):
        super().__init__()
        if swap_halves and len(org_modules) != 1:
            raise ValueError(f"{lora_name}: swap_halves needs exactly one part")
        in_features = {m.in_features for m in org_modules}
        if len(in_features) != 1:
            raise ValueError(f"{lora_name}: the fused parts have different inputs {sorted(in_features)}")
        self.lora_name = lora_name
        self.split_rank = lora_dim if split and len(org_modules) > 1 else None
        if self.split_rank is not None:
            alpha = len(org_modules) * float(lora_dim if not alpha else alpha)
            lora_dim = len(org_modules) * lora_dim
        self.lora_dim = lora_dim
        self.sizes = [m.out_features for m in org_modules]
        self.swap_halves = swap_halves
        self.lora_down = nn.Linear(in_features.pop(), lora_dim, bias=False)
        self.lora_up = nn.Linear(lora_dim, sum(self.sizes), bias=False)
        alpha = float(lora_dim if not alpha else alpha)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / lora_dim
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        object.__setattr__(self, "org_modules", list(org_modules))  # not submodules: their weights stay the model's
        self.org_forwards: list[Any] = []
        self.register_load_state_dict_post_hook(FusedLoRAModule._refresh_scale)

    @staticmethod
    def _refresh_scale(module: "FusedLoRAModule", incompatible_keys: Any) -> None:
        module.scale = float(module.alpha.detach().float()) / module.lora_dim

    def _rows(self, part: int) -> slice | torch.Tensor:
        """The rows of ``lora_up`` (and of the fused update) that feed part ``part``, in the part's order."""
        if self.swap_halves:
            half = self.sizes[0] // 2
            return torch.cat([torch.arange(half, 2 * half), torch.arange(0, half)])
        start = sum(self.sizes[:part])
        return slice(start, start + self.sizes[part])

    def apply_to(self) -> None:
        if self.org_forwards:
            raise RuntimeError(f"{self.lora_name} is already applied")
        for part, module in enumerate(self.org_modules):
            self.org_forwards.append(module.forward)
            module.forward = self._part_forward(part, module.forward)

    def _part_forward(self, part: int, org_forward: Any) -> Any:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return org_forward(x, *args, **kwargs) + self.delta(x, part).to(x.dtype)
        return forward

    def delta(self, x: torch.Tensor, part: int) -> torch.Tensor:
        """The LoRA's contribution to part ``part``'s output for input ``x``."""
        w = self.lora_down.weight
        cols = slice(None) if self.split_rank is None else slice(part * self.split_rank, (part + 1) * self.split_rank)
        if self.module_dropout is not None and self.training and torch.rand(1) < self.module_dropout:
            return torch.zeros((*x.shape[:-1], self.sizes[part]), device=x.device, dtype=w.dtype)
        w = w[cols]
        lx = F.linear(x.to(w.dtype), w)
        if self.dropout is not None and self.training:
            lx = F.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout is not None and self.training:
            mask = torch.rand((lx.size(0), w.shape[0]), device=lx.device) > self.rank_dropout
            lx = lx * (mask.unsqueeze(1) if lx.dim() == 3 else mask)
            scale = scale / (1.0 - self.rank_dropout)
        out = F.linear(lx, self.lora_up.weight[self._rows(part)][:, cols])
        multiplier = self.multiplier
        if isinstance(multiplier, torch.Tensor):  # one multiplier per sample
            multiplier = multiplier.to(out.device, out.dtype).view(-1, *([1] * (out.dim() - 1)))
        return out * (multiplier * scale)

    @torch.no_grad()
    def merge_to(self, sd: Mapping[str, torch.Tensor], multiplier: float, dtype: torch.dtype | None,
                 device: Any) -> None:
        """Add ``multiplier * alpha / r * up[rows] @ down`` from ``sd`` to each part's weight."""
        down = sd["lora_down.weight"].to(torch.float32)
        up = sd["lora_up.weight"].to(torch.float32)
        rank = down.shape[0]
        alpha = float(sd["alpha"]) if "alpha" in sd else rank
        delta = up @ down * (multiplier * alpha / rank)
        for part, module in enumerate(self.org_modules):
            weight = module.weight
            target = weight.device if device is None else device
            merged = weight.to(target, torch.float32) + delta[self._rows(part)].to(target)
            weight.copy_(merged.to(dtype or weight.dtype))


class FusedLoRANetwork(LoRANetwork):
    """The kohya network interface (``apply_to``, save/load/merge from ``networks.lora.LoRANetwork``) with
    per-text-encoder learning rates. Subclasses find their modules (calling :meth:`_add`,
    :meth:`_add_text_encoder_loras`) and name their text encoders' prefixes in :attr:`TEXT_ENCODER_GROUPS`."""

    TEXT_ENCODER_GROUPS: tuple[tuple[str, str], ...] = ()

    def __init__(self, options: FusedLoRAOptions, multiplier: float = 1.0):
        nn.Module.__init__(self)  # LoRANetwork's __init__ discovers SD modules; the state below is what it sets up
        self.options = options
        self.multiplier = multiplier
        self.applied = False
        self.dropped: list[str] = []
        self.text_encoder_loras: list[nn.Module] = []
        self.unet_loras: list[nn.Module] = []

    def _add(self, lora: nn.Module, into: list[nn.Module]) -> None:
        self.add_module(lora.lora_name, lora)
        into.append(lora)

    def _dropouts(self) -> dict[str, float | None]:
        o = self.options
        return dict(dropout=o.dropout, rank_dropout=o.rank_dropout, module_dropout=o.module_dropout)

    def _add_text_encoder_loras(self, targets: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
        """A plain LoRA on each ``(name, layer)`` that ``options.text_encoder_rank`` gives a rank; returns those."""
        added = []
        for name, module in targets:
            rank = self.options.text_encoder_rank(name)
            if rank is not None:
                self._add(LoRAModule(name, module, self.multiplier, rank[0], rank[1], **self._dropouts()),
                          self.text_encoder_loras)
                added.append((name, module))
        return added

    def _log_modules(self, log: logging.Logger, message: str) -> None:
        """Log ``message`` with the text-encoder and transformer module counts; with ``verbose``, every module."""
        log.info(message, len(self.text_encoder_loras), len(self.unet_loras))
        if self.options.verbose:
            for lora in self.all_loras():
                log.info("  %-56s rank %d alpha %g", lora.lora_name, lora.lora_dim, float(lora.alpha))

    def prepare_optimizer_params(self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None,
                                 default_lr: float | None) -> tuple[list[dict[str, Any]], list[str]]:
        """Groups: each text encoder of :attr:`TEXT_ENCODER_GROUPS` in order (``text_encoder_lr[i]``, else its
        last value), the transformer (``unet_lr``); each falls back to ``default_lr``. LoRA+ puts ``lora_up`` in
        its own group at ``lr * ratio``. Modules matching a ``network_reg_lrs`` regex (``options.reg_lrs``) get
        its rate, in groups ``reg_lr_<i>`` before the others (sd-scripts' order). Groups with lr 0 are left out."""
        self.requires_grad_(True)
        te_lrs = list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else (
            [] if text_encoder_lr is None else [text_encoder_lr])
        o = self.options
        groups: list[dict[str, Any]] = []
        descriptions: list[str] = []

        reg_lrs = getattr(o, "reg_lrs", ())

        def add(loras: list[nn.Module], lr: float | None, ratio: float | None, description: str) -> None:
            by_regex: dict[int, list[nn.Module]] = {}
            for lora in loras:
                index = next((i for i, (rx, _) in enumerate(reg_lrs) if re.search(rx, lora.lora_name)), -1)
                by_regex.setdefault(index, []).append(lora)
            for index in sorted(i for i in by_regex if i >= 0):
                add_groups(by_regex[index], reg_lrs[index][1], ratio, f"reg_lr_{index}")
            add_groups(by_regex.get(-1, []), lr, ratio, description)

        def add_groups(loras: list[nn.Module], lr: float | None, ratio: float | None, description: str) -> None:
            plain = [p for m in loras for n, p in m.named_parameters() if ratio is None or "lora_up" not in n]
            plus = [p for m in loras for n, p in m.named_parameters() if ratio is not None and "lora_up" in n]
            plus_lr = None if lr is None else lr * (ratio or 1)
            for params, group_lr, suffix in ((plain, lr, ""), (plus, plus_lr, " plus")):
                if params and group_lr != 0:
                    groups.append({"params": params} if group_lr is None else {"params": params, "lr": group_lr})
                    descriptions.append(description + suffix)

        te_ratio = o.loraplus_text_encoder_lr_ratio or o.loraplus_lr_ratio
        for i, (prefix, label) in enumerate(self.TEXT_ENCODER_GROUPS):
            loras = [m for m in self.text_encoder_loras if m.lora_name.startswith(prefix + "_")]
            lr = te_lrs[min(i, len(te_lrs) - 1)] if te_lrs else default_lr
            add(loras, lr, te_ratio, label)
        add(self.unet_loras, unet_lr if unet_lr is not None else default_lr,
            o.loraplus_unet_lr_ratio or o.loraplus_lr_ratio, "unet")
        return groups, descriptions


def linear_targets(model: nn.Module, class_names: Collection[str], prefix: str) -> list[tuple[str, nn.Linear]]:
    """Every ``Linear`` inside the modules of ``model`` whose class is one of ``class_names``, with sd-scripts'
    name ``<prefix>_<path with _>``."""
    found = []
    for name, module in model.named_modules():
        if type(module).__name__ in class_names:
            for child_name, child in module.named_modules():
                if isinstance(child, nn.Linear):
                    found.append((f"{prefix}_{name}.{child_name}".replace(".", "_"), child))
    return found


def shapes_from_file(file: str | os.PathLike | None, weights_sd: Mapping[str, torch.Tensor] | None
                     ) -> tuple[str, dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """For ``create_network_from_weights``: the source's name, its weights (read from ``file`` unless given)
    and each module's rank and alpha (alpha defaults to the rank, as in sd-scripts)."""
    source = str(file) if file is not None else "the given weights"
    weights = load_lora_file(file) if weights_sd is None else dict(weights_sd)
    modules_dim: dict[str, int] = {}
    modules_alpha: dict[str, float] = {}
    for name, sd in _split_by_module(weights).items():
        if "lora_down.weight" in sd:
            modules_dim[name] = int(sd["lora_down.weight"].shape[0])
            modules_alpha[name] = float(sd["alpha"]) if "alpha" in sd else modules_dim[name]
    if not modules_dim:
        raise UserError(f"{source} has no lora_down weights: it is not a kohya-format LoRA file")
    return source, weights, modules_dim, modules_alpha


def network_for_file(network: FusedLoRANetwork, source: str, weights: Mapping[str, torch.Tensor],
                     modules_dim: Mapping[str, int], model: str, hint: str, for_inference: bool
                     ) -> tuple[FusedLoRANetwork, dict[str, torch.Tensor]]:
    """Refuse a file with modules that ``network`` lacks (naming ``model`` and a ``hint`` on what that may mean),
    freeze the network for inference, and return the weights under sd-scripts' names."""
    unmatched = set(modules_dim) - {lora.lora_name for lora in network.all_loras()}
    if unmatched:
        raise UserError(f"{source}: {len(unmatched)} LoRA modules match nothing in this {model} "
                        f"({_listing(unmatched)}); {hint}")
    if for_inference:
        network.requires_grad_(False)
        network.eval()
    return network, {standard_key(k): v for k, v in weights.items()}


def network_from_file(make: Callable[[FusedLoRAOptions], FusedLoRANetwork],
                      parse: Callable[[Mapping[str, Any]], FusedLoRAOptions], shape_args: Collection[str],
                      file: str | os.PathLike | None, weights_sd: Mapping[str, torch.Tensor] | None,
                      kwargs: Mapping[str, Any], *, model: str, hint: str, for_inference: bool
                      ) -> tuple[FusedLoRANetwork, dict[str, torch.Tensor]]:
    """``create_network_from_weights`` of a family: the network ``make`` builds with the ranks and alphas of the
    file, and of ``kwargs`` (``--network_args``, checked by ``parse``) what is not a shape (``shape_args``);
    then :func:`network_for_file`."""
    source, weights, modules_dim, modules_alpha = shapes_from_file(file, weights_sd)
    parsed = parse({k: v for k, v in kwargs.items() if k not in shape_args})
    network = make(parsed.for_file(modules_dim, modules_alpha))
    return network_for_file(network, source, weights, modules_dim, model, hint, for_inference)
