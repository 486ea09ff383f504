"""What the LoRA tool scripts share: their common options, input checks, and the merge commands.

Every command checks its inputs and output before any model loads (a problem is one ``UserError``), writes
atomically and never replaces an existing output without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from library.errors import UserError
from library.lora_tools import block_weights, merge, outputs
from library.lora_tools import targets as fam
from library.lora_tools.lora_file import LoRAFile, check_lora_path, read_lora, write_lora
from library.models.metadata import IMPL_STABILITY_AI, modelspec

logger = logging.getLogger(__name__)
PRECISION_CHOICES = ("float", "fp16", "bf16")


def add_precision_arguments(p: argparse.ArgumentParser, *, precision: bool) -> None:
    p.add_argument("--save_precision", choices=PRECISION_CHOICES, default=None,
                   help="precision of the saved weights (default: --precision, or the file's for LoRA-only tools)")
    if precision:
        p.add_argument("--precision", choices=PRECISION_CHOICES, default="float",
                       help="precision the merge is computed and the model held in (default float)")


def add_lbws_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lbws", nargs="*", default=None,
                   help="block weights of each LoRA, one JSON list per LoRA, e.g. \"[1,0,0,0,0,0,1,1,1,1,1,1]\" "
                        "(SD1.x/2.x: 17 or 26 values, SDXL: 12 or 20, FLUX.1: 61, SD3: 29 or 43, Lumina-2: 33; "
                        "see docs/lora_tools.md)")


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="device for the computation, e.g. cuda (default cpu)")
    p.add_argument("--no_metadata", action="store_true",
                   help="do not write modelspec metadata (the minimum ss_* keys are still written)")
    p.add_argument("--overwrite", action="store_true", help="replace --save_to if it exists")


def resolve_device(name: str | None) -> torch.device:
    """``--device``; a CUDA device without CUDA is an error, never a silent fallback to the CPU."""
    if not name:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def read_loras(paths: Sequence[str]) -> list[LoRAFile]:
    """Read every LoRA file (all paths are checked first, so a typo in the last one costs nothing)."""
    problems = []
    for path in paths:
        try:
            check_lora_path(path)
        except UserError as err:
            problems.append(err.message)
    if problems:
        raise UserError.from_problems("--models", problems)
    return [read_lora(path) for path in paths]


def lora_families(files: Sequence[LoRAFile]) -> str | None:
    """The family the files share; files for different families are an error."""
    found = {str(f.path): fam.lora_family(f.modules, f.metadata) for f in files}
    families = set(found.values())
    if len(families) > 1:
        listing = ", ".join(f"{path}: {fam.family_label(name)}" for path, name in found.items())
        raise UserError(f"the LoRA files are for different model families ({listing}); merge files of one family")
    return families.pop() if families else None


def save_dtype(args: argparse.Namespace) -> torch.dtype | None:
    return outputs.precision_dtype(args.save_precision or getattr(args, "precision", None))


def _merged_lora_metadata(args: argparse.Namespace, files: list[LoRAFile], modules, save_to: Path) -> dict[str, str]:
    name = lora_families(files)
    family = outputs.lora_model_family(name, files[0].metadata, modules)
    return outputs.lora_metadata(modules, family, title=save_to.stem, merged_from=files, no_metadata=args.no_metadata,
                                 network_module=outputs.network_module_of(name))


def merge_weights(args: argparse.Namespace, ratios: list[float], files: Sequence[LoRAFile]
                  ) -> block_weights.MergeWeights:
    """``--ratios`` with ``--lbws`` (checked against the LoRAs' family and blocks); the block weights are printed."""
    family = lora_families(files)
    row = fam.lora_family_row(family)
    weights = block_weights.parse_lbws(getattr(args, "lbws", None), ratios, row.blocks if row else None,
                                       {n for f in files for n in f.modules}, fam.family_label(family))
    for line in block_weights.describe(weights):
        print(line)
    return weights


def merge_into_lora(args: argparse.Namespace) -> None:
    """``merge_lora.py`` without ``--sd_model``: exact merge by rank concatenation."""
    ratios = outputs.check_ratios(args.models, args.ratios)
    save_to = outputs.check_output(args.save_to, overwrite=args.overwrite, inputs=args.models)
    resolve_device(args.device)
    files = read_loras(args.models)
    weights = merge_weights(args, ratios, files)
    modules = merge.concat_loras(files, weights, shuffle=args.shuffle)
    write_lora(save_to, modules, _merged_lora_metadata(args, files, modules, save_to), save_dtype(args))
    ranks = sorted({m.rank for m in modules.values()})
    print(f"saved {save_to}: {len(modules)} modules, rank {'/'.join(map(str, ranks))} (ranks concatenated)")


def svd_merge_loras(args: argparse.Namespace) -> None:
    """``svd_merge_lora.py``: SVD of the summed deltas to ``--new_rank`` / ``--new_conv_rank``."""
    ratios = outputs.check_ratios(args.models, args.ratios)
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        raise UserError("--new_rank and --new_conv_rank must be at least 1")
    save_to = outputs.check_output(args.save_to, overwrite=args.overwrite, inputs=args.models)
    device = resolve_device(args.device)
    files = read_loras(args.models)
    weights = merge_weights(args, ratios, files)
    conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    modules = merge.svd_merge(files, weights, args.new_rank, conv_rank, device=device)
    write_lora(save_to, modules, _merged_lora_metadata(args, files, modules, save_to), save_dtype(args))
    print(f"saved {save_to}: {len(modules)} modules, rank {args.new_rank} (conv {conv_rank})")


def _checkpoint_metadata(args: argparse.Namespace, family, save_to: Path) -> dict[str, str] | None:
    if args.no_metadata:
        return None
    spec = modelspec(
        family.modelspec_architecture,
        title=save_to.stem,
        resolution=family.default_resolution,
        prediction_type=family.objective.modelspec_prediction_type,
        implementation=IMPL_STABILITY_AI,
    )
    spec["modelspec.merged_from"] = ", ".join(Path(p).stem for p in [args.sd_model, *args.models])
    return spec


def checkpoint_for(path: str, v2: bool, v_parameterization: bool, what: str):
    """The family of a checkpoint read from the file; ``--v2`` given for another file than SD2 is an error."""
    family = fam.checkpoint_family(path, True if v_parameterization else None)
    if v2 and not family.ss_v2:
        raise UserError(f"{what} {path} is a model of the {fam.family_label(family.name)} family but --v2 is set "
                        "(--v2 means Stable Diffusion 2.x); remove --v2")
    return family


def add_text_encoder_file_arguments(p: argparse.ArgumentParser) -> None:
    """sd-scripts' ``flux_merge_lora.py`` options for text encoder files merged beside the model."""
    for name, (what, prefix) in {"clip_l": ("CLIP-L", "lora_te1_"), "t5xxl": ("T5-XXL", "lora_te3_")}.items():
        p.add_argument(f"--{name}", default=None,
                       help=f"{what} file (.safetensors) to merge the LoRAs' {prefix} modules into (FLUX.1); "
                            f"needs --{name}_save_to")
        p.add_argument(f"--{name}_save_to", default=None, help=f"where the merged {what} file is written (.safetensors)")


def text_encoder_files(args: argparse.Namespace, family, outputs_so_far: list[Path]) -> list[tuple[str, Path, Path]]:
    """``(option, file, save_to)`` of each text encoder file given beside ``--sd_model``, checked before anything
    loads: the family must take it (its ``LORA_FAMILIES`` row), both options given, a .safetensors input and an
    output that is new (or ``--overwrite``), no input and no other output."""
    from library.lora_tools.stored import TEXT_ENCODER_FILES

    row = fam.row_of_model(family)
    taken = row.text_encoder_files if row is not None else ()
    found, problems = [], []
    for name in TEXT_ENCODER_FILES:
        given, save_to = getattr(args, name, None), getattr(args, f"{name}_save_to", None)
        if given is None and save_to is None:
            continue
        if name not in taken:
            problems.append(f"--{name}: {fam.family_label(family.name)} models take no separate text encoder file; "
                            f"remove --{name} and --{name}_save_to")
        elif given is None or save_to is None:
            problems.append(f"--{name} and --{name}_save_to go together: the file to merge into and where to write it")
        elif not Path(given).expanduser().is_file() or Path(given).suffix.lower() != ".safetensors":
            problems.append(f"--{name} {given}: not found, or not a .safetensors file")
        else:
            out = outputs.check_output(save_to, overwrite=args.overwrite, lora=False,
                                       inputs=[args.sd_model, *args.models, given])
            if out.suffix.lower() != ".safetensors" or any(out.resolve() == o.resolve() for o in outputs_so_far):
                problems.append(f"--{name}_save_to {out}: give a new .safetensors file (not another output)")
            outputs_so_far.append(out)
            found.append((name, Path(given).expanduser(), out))
    if problems:
        raise UserError.from_problems("text encoder files", problems)
    return found


def merge_into_checkpoint(args: argparse.Namespace) -> None:
    """``merge_lora.py --sd_model``: add every LoRA's delta to the checkpoint's weights (and to the text encoder
    files given beside it) and save them."""
    from library.lora_tools.stored import TEXT_ENCODER_FILES, read_stored

    ratios = outputs.check_ratios(args.models, args.ratios)
    save_to = outputs.check_output(args.save_to, overwrite=args.overwrite, inputs=[args.sd_model, *args.models],
                                   lora=False)
    fam.output_model_format(save_to)
    device = resolve_device(args.device)
    family = checkpoint_for(args.sd_model, args.v2, args.v_parameterization, "--sd_model")
    fam.check_can_save(family, save_to)
    te_files = text_encoder_files(args, family, [save_to])
    files = read_loras(args.models)
    wrong = [f"{f.path} is a {fam.family_label(name)} LoRA" for f in files
             if not fam.same_family(name := fam.lora_family(f.modules, f.metadata), family)]
    if wrong:
        raise UserError.from_problems(f"--sd_model {args.sd_model} is {fam.family_label(family.name)}", wrong)
    weights = merge_weights(args, ratios, files)
    times = [time.perf_counter()]
    dtype = outputs.precision_dtype(args.precision)
    model = fam.load_model_for_lora(args.sd_model, family, dtype=dtype)
    model.extras = [(read_stored(path, TEXT_ENCODER_FILES[name], dtype, f"--{name}"), out)
                    for name, path, out in te_files]
    times.append(time.perf_counter())
    changed = merge.merge_into_model(model, files, weights, device=device)
    times.append(time.perf_counter())
    model.save(save_to, save_dtype(args), _checkpoint_metadata(args, family, save_to))
    times.append(time.perf_counter())
    load_s, merge_s, save_s = (b - a for a, b in zip(times, times[1:]))
    also = "".join(f" and {out}" for _, _, out in te_files)
    print(f"saved {save_to}{also}: {changed} weights changed by {len(files)} LoRA file(s) "
          f"(load {load_s:.1f}s, merge {merge_s:.1f}s, save {save_s:.1f}s)")
