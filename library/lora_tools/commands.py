"""The resize, extract and check commands (the merge commands are in ``common``)."""

from __future__ import annotations

import argparse
import time

from library.errors import UserError
from library.lora_tools import check, outputs, resize
from library.lora_tools import targets as fam
from library.lora_tools.common import checkpoint_for, resolve_device, save_dtype
from library.lora_tools.extract import ExtractSettings, extract_lora
from library.lora_tools.lora_file import read_lora, write_lora
from library.lora_tools.lowrank import DYNAMIC_METHODS, RankChoice


def _dynamic_choice(args: argparse.Namespace) -> tuple[RankChoice, RankChoice]:
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        raise UserError("--new_rank and --new_conv_rank must be at least 1")
    method, param = args.dynamic_method, args.dynamic_param
    if method is not None and method not in DYNAMIC_METHODS:
        raise UserError(f"--dynamic_method {method}: use one of {', '.join(DYNAMIC_METHODS)}")
    if method is not None and param is None:
        raise UserError(f"--dynamic_method {method} needs --dynamic_param (e.g. 0.9 for sv_fro/sv_cumulative, "
                        "4 for sv_ratio)")
    if method is None and param is not None:
        raise UserError("--dynamic_param needs --dynamic_method (sv_ratio, sv_fro or sv_cumulative)")
    if method == "sv_ratio" and param < 1:
        raise UserError(f"--dynamic_param {param}: sv_ratio is the largest/smallest kept singular value, >= 1")
    if method in ("sv_fro", "sv_cumulative") and not 0 < param <= 1:
        raise UserError(f"--dynamic_param {param}: {method} is the share to keep, in (0, 1]")
    conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    return RankChoice(args.new_rank, method, param), RankChoice(conv_rank, method, param)


def run_resize(args: argparse.Namespace) -> None:
    """``resize_lora.py``."""
    linear, conv = _dynamic_choice(args)
    if not args.model:
        raise UserError("--model is required: the LoRA file to resize")
    save_to = outputs.check_output(args.save_to, overwrite=args.overwrite, inputs=[args.model])
    device = resolve_device(args.device)
    lora = read_lora(args.model)
    modules, report = resize.resize_lora(lora, linear, conv, device=device)
    if args.verbose:
        print(resize.describe(report))
    target = "Dynamic" if args.dynamic_method else str(args.new_rank)
    base = dict(lora.metadata)
    base["ss_training_comment"] = resize.resize_comment(lora, report, target)
    name = fam.lora_family(lora.modules, lora.metadata)
    family = outputs.lora_model_family(name, lora.metadata, lora.modules)
    no_spec = args.no_metadata or not any(k.startswith("modelspec.") for k in base)
    meta = outputs.lora_metadata(modules, family, title=base.get("modelspec.title", save_to.stem), base=base,
                                 no_metadata=no_spec, network_module=outputs.network_module_of(name))
    if args.dynamic_method:
        meta["ss_network_dim"] = meta["ss_network_alpha"] = "Dynamic"
    write_lora(save_to, modules, meta, outputs.precision_dtype(args.save_precision) or lora_dtype(lora))
    ranks = sorted({r.new_rank for r in report})
    shown = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    print(f"saved {save_to}: {len(modules)} modules, rank {shown}")


def lora_dtype(lora) -> object:
    """The dtype the file's weights are in (the resized file keeps it unless --save_precision)."""
    return next(iter(lora.modules.values())).down.dtype


def run_extract(args: argparse.Namespace) -> None:
    """``extract_lora_from_models.py``."""
    settings = ExtractSettings(args.dim, args.conv_dim, args.clamp_quantile, args.min_diff)
    if settings.dim < 1 or (settings.conv_dim is not None and settings.conv_dim < 1):
        raise UserError("--dim and --conv_dim must be at least 1")
    if not 0 < settings.clamp_quantile <= 1:
        raise UserError(f"--clamp_quantile {settings.clamp_quantile}: must be in (0, 1] (default 0.99)")
    if settings.min_diff < 0:
        raise UserError(f"--min_diff {settings.min_diff}: must be >= 0")
    for flag in ("load_original_model_to", "load_tuned_model_to"):
        where = getattr(args, flag)
        if where and where != "cpu":
            raise UserError(f"--{flag} {where}: models load on the CPU here; use --device {where} for the SVD")
    if not args.model_org or not args.model_tuned:
        raise UserError("--model_org and --model_tuned are required: the base model and its fine-tune")
    save_to = outputs.check_output(args.save_to, overwrite=args.overwrite, inputs=[args.model_org, args.model_tuned])
    device = resolve_device(args.device)
    v_param = bool(args.v_parameterization)
    family_org = checkpoint_for(args.model_org, args.v2, v_param, "--model_org")
    family_tuned = checkpoint_for(args.model_tuned, args.v2, v_param, "--model_tuned")
    if family_org.name != family_tuned.name:
        raise UserError(f"--model_org is {fam.family_label(family_org.name)} but --model_tuned is "
                        f"{fam.family_label(family_tuned.name)}; extract from a model and its fine-tune")
    if args.sdxl and family_org.name != "sdxl":
        raise UserError(f"--sdxl is set but --model_org {args.model_org} is {fam.family_label(family_org.name)}; "
                        "the family is read from the files: remove --sdxl")
    dtype = outputs.precision_dtype(args.load_precision) or outputs.precision_dtype("float")
    start = time.perf_counter()
    org = fam.load_model_for_lora(args.model_org, family_org, dtype=dtype)
    tuned = fam.load_model_for_lora(args.model_tuned, family_tuned, dtype=dtype)
    modules = extract_lora(org, tuned, settings, device=device)
    meta = outputs.lora_metadata(modules, family_tuned if v_param else family_org, title=save_to.stem,
                                 no_metadata=args.no_metadata,
                                 network_module=outputs.network_module_of(family_org.spec_name))
    write_lora(save_to, modules, meta, save_dtype(args))
    te = sorted({n.split("_")[1] for n in modules if n.startswith("lora_te")})
    print(f"saved {save_to}: {len(modules)} modules (text encoders: {', '.join(te) or 'none'}), rank {settings.dim}"
          + (f", conv rank {settings.conv_dim}" if settings.conv_dim else "")
          + f" in {time.perf_counter() - start:.1f}s")


def run_check(args: argparse.Namespace) -> None:
    """``check_lora_weights.py``."""
    lora = read_lora(args.file)
    report = check.inspect(lora)
    if not args.no_loaders:
        report.loaders = check.check_loaders(lora, report.family)
    if args.show_all_keys:
        print(check.render_keys(lora))
    print(check.render(lora, report))
