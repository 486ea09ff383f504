"""What a LoRA file holds (``check_lora_weights.py``): family, modules targeted, ranks, alphas, norms, unusual
keys, metadata consistency, and whether our loader and diffusers accept it.

Loader checks run against full-size models of the file's family built on the ``meta`` device (no weights, no
memory): our ``networks.lora`` must match every module by name and shape; diffusers' ``load_lora_weights`` is
asked to inject the file, and the modules it wrapped are counted.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from library.errors import UserError
from library.lora_tools import targets as fam
from library.lora_tools.lora_file import LoRAFile, LoRAModuleWeights, dims_metadata, lora_state_dict


@dataclass
class CheckReport:
    family: str | None
    parts: dict[str, int]
    kinds: dict[str, int]
    ranks: dict[int, int]
    alphas: dict[float, int]
    norms: dict[str, float]
    largest: list[tuple[str, float]]
    zero_modules: list[str]
    non_finite: list[str]
    notes: list[str]
    ignored_keys: list[str]
    metadata_problems: list[str]
    loaders: dict[str, str] = field(default_factory=dict)


def _part(name: str) -> str:
    return "unet" if name.startswith("lora_unet_") else name.split("_")[1]


def _kind(m: LoRAModuleWeights) -> str:
    return "conv 3x3 (LoCon)" if m.is_3x3 else ("conv 1x1" if m.is_conv else "linear")


def _data_sha256(path) -> str | None:
    """sha256 of the data section of a safetensors file (what ``sshs_model_hash`` holds)."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _metadata_problems(lora: LoRAFile) -> list[str]:
    meta = lora.metadata
    problems = []
    actual = dims_metadata(lora.modules.values())
    for key in ("ss_network_dim", "ss_network_alpha"):
        if key in meta and meta[key] != actual[key] and not _same_number(meta[key], actual[key]):
            problems.append(f"{key} says {meta[key]}, the tensors say {actual[key]}")
    if "sshs_model_hash" in meta and lora.path.suffix.lower() == ".safetensors":
        if _data_sha256(lora.path) != meta["sshs_model_hash"]:
            problems.append("sshs_model_hash does not match the tensors (the file was changed after it was hashed)")
    return problems


def _same_number(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b))
    except ValueError:
        return False


def inspect(lora: LoRAFile) -> CheckReport:
    """Everything that needs only the file."""
    norms = {}
    zero, non_finite = [], []
    for name, m in lora.modules.items():
        if not (torch.isfinite(m.down).all() and torch.isfinite(m.up).all()):
            non_finite.append(name)
            continue
        norms[name] = m.delta_norm()
        if norms[name] == 0:
            zero.append(name)
    values = list(norms.values()) or [0.0]
    return CheckReport(
        family=fam.lora_family(lora.modules, lora.metadata),
        parts=dict(sorted(Counter(_part(n) for n in lora.modules).items())),
        kinds=dict(Counter(_kind(m) for m in lora.modules.values())),
        ranks=dict(sorted(Counter(m.rank for m in lora.modules.values()).items())),
        alphas=dict(sorted(Counter(m.alpha for m in lora.modules.values()).items())),
        norms={"min": min(values), "mean": sum(values) / len(values), "max": max(values)},
        largest=sorted(norms.items(), key=lambda kv: -kv[1])[:3],
        zero_modules=sorted(zero),
        non_finite=sorted(non_finite),
        notes=list(lora.notes),
        ignored_keys=list(lora.ignored_keys),
        metadata_problems=_metadata_problems(lora),
    )


def _layers(lora: Any) -> int:
    """How many of the model's layers a network module covers (a fused module: its split parts)."""
    return len(getattr(lora, "org_modules", None) or [lora])


def _our_loader(lora: LoRAFile, row: fam.LoRAFamily, text_encoders, denoiser) -> tuple[str, dict[str, int]]:
    """Our network module's verdict, and the model layers its modules cover per part (``unet``, ``text encoder``)."""
    import importlib

    network_module = importlib.import_module(row.network_module)
    state = lora_state_dict(lora.modules)
    try:
        network, _ = network_module.create_network_from_weights(1.0, None, None, text_encoders, denoiser,
                                                                weights_sd=state)
    except UserError as err:
        return f"no: {err.message}", {}
    own = network.state_dict()
    wrong = [n for n, m in lora.modules.items()
             if tuple(own[f"{n}.lora_down.weight"].shape) != tuple(m.down.shape)
             or tuple(own[f"{n}.lora_up.weight"].shape) != tuple(m.up.shape)]
    covered = {"unet": sum(_layers(m) for m in network.unet_loras),
               "text encoder": sum(_layers(m) for m in network.text_encoder_loras)}
    if wrong:
        return f"no: {len(wrong)} modules have other shapes than the model, e.g. {wrong[0]}", covered
    return f"yes: all {len(network.all_loras())} modules match ({row.network_module})", covered


def _diffusers_loader(lora: LoRAFile, row: fam.LoRAFamily, text_encoders, denoiser, expected: dict[str, int]) -> str:
    """Ask diffusers to inject the file; count the layers it wrapped against the layers our network's modules
    cover (``expected``; a fused FLUX/SD3/Lumina module covers its split layers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = row.pipeline(text_encoders, denoiser)
    state = lora_state_dict(lora.modules)
    quiet = logging.getLogger("diffusers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        pipe.load_lora_weights(state, low_cpu_mem_usage=True)
    except Exception as err:  # noqa: BLE001 - diffusers' own refusal is the answer we report
        return f"no: {type(err).__name__}: {err}"
    finally:
        quiet.setLevel(level)
    present = [te for te in text_encoders if te is not None]
    injected = {
        "unet": sum(isinstance(m, BaseTunerLayer) for m in denoiser.modules()),
        "text encoder": sum(isinstance(m, BaseTunerLayer) for te in present for m in te.modules()),
    }
    counts = ", ".join(f"{part} {injected[part]}/{expected[part]}" for part in expected if expected[part])
    verdict = ("yes" if all(injected[p] == expected[p] for p in expected)
               else "no" if not any(injected.values()) else "partly")
    return f"{verdict}: layers applied: {counts}"


def check_loaders(lora: LoRAFile, family: str | None) -> dict[str, str]:
    """``{"networks.lora": verdict, "diffusers": verdict}`` against full-size models of the family on meta."""
    row = fam.lora_family_row(family)
    if row is None or row.reference is None or row.spec not in fam.FAMILY_SPECS:
        why = f"not checked: no full-size {fam.family_label(family)} reference model in the LoRA tools yet"
        return {"networks.lora": why, "diffusers": why}
    text_encoders, denoiser = row.reference(family)
    ours, covered = _our_loader(lora, row, text_encoders, denoiser)
    verdicts = {"networks.lora": ours}
    if not covered:  # our loader refused the file: one layer per module
        covered = {"unet": sum(n.startswith("lora_unet_") for n in lora.modules),
                   "text encoder": sum(n.startswith("lora_te") for n in lora.modules)}
    # our check leaves the models unchanged
    verdicts["diffusers"] = _diffusers_loader(lora, row, text_encoders, denoiser, covered)
    return verdicts


def _counts(counter: Mapping) -> str:
    return ", ".join(f"{k:g}: {v}" if isinstance(k, float) else f"{k}: {v}" for k, v in counter.items())


def render(lora: LoRAFile, report: CheckReport) -> str:
    """The report as text."""
    n = len(lora.modules)
    supported = "" if fam.models_supported(report.family) else " (models of this family are not supported here yet)"
    lines = [
        f"file: {lora.path}",
        f"family: {fam.family_label(report.family)}{supported}",
        f"modules: {n} ({_counts(report.parts)}); {_counts(report.kinds)}",
        f"ranks: {_counts(report.ranks)}",
        f"alphas: {_counts(report.alphas)}",
        "delta norms |up @ down * alpha / r|: min {min:.4g}, mean {mean:.4g}, max {max:.4g}".format(**report.norms),
        "largest: " + ", ".join(f"{name} ({value:.4g})" for name, value in report.largest),
    ]
    for key in ("ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args"):
        if key in lora.metadata:
            lines.append(f"{key}: {lora.metadata[key]}")
    warnings = [f"note: {note}" for note in report.notes]
    if report.ignored_keys:
        shown = ", ".join(report.ignored_keys[:5]) + (" ..." if len(report.ignored_keys) > 5 else "")
        warnings.append(f"unusual: {len(report.ignored_keys)} keys are not LoRA weights and were ignored: {shown}")
    if report.zero_modules:
        warnings.append(f"note: {len(report.zero_modules)} modules change nothing (lora_up or lora_down is zero)")
    if report.non_finite:
        warnings.append(f"problem: {len(report.non_finite)} modules hold NaN/inf, e.g. {report.non_finite[0]}")
    warnings += [f"metadata: {p}" for p in report.metadata_problems]
    lines += warnings
    lines += [f"loads in {name}: {verdict}" for name, verdict in report.loaders.items()]
    return "\n".join(lines)


def render_keys(lora: LoRAFile) -> str:
    """sd-scripts' per-key lines: ``key,shape,mean |v|,min |v|`` (in the standard key names)."""
    lines = []
    for key, value in lora_state_dict(lora.modules).items():
        v = value.float().abs()
        shape = str(tuple(value.shape)).replace(", ", "-")
        lines.append(f"{key},{shape},{float(v.mean())},{float(v.min())}")
    return "\n".join(lines)
