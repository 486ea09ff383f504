"""The ``ss_*`` metadata of a trained LoRA file, with the keys and value formats of sd-scripts
(every value a string; JSON for ``ss_datasets``, ``ss_tag_frequency``, ``ss_bucket_info``,
``ss_network_args``), so tools that read kohya LoRA metadata (A1111, ComfyUI, Civitai) understand ours.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from library.config.params import DatasetGroupParams, DreamBoothSubsetParams, FineTuningSubsetParams

MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")


@dataclass
class DatasetStats:
    """What the built dataset knows that the parameters do not: counts, tags and buckets per dataset.

    ``tag_frequency`` maps a subset's folder name to ``{tag: count}``; ``bucket_info`` is
    ``{"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": e}`` or None.
    """

    num_train_images: list[int] = field(default_factory=list)
    num_reg_images: list[int] = field(default_factory=list)
    subset_image_counts: list[list[int]] = field(default_factory=list)
    tag_frequency: list[dict[str, dict[str, int]]] = field(default_factory=list)
    bucket_info: list[dict[str, Any] | None] = field(default_factory=list)


@dataclass
class RunFacts:
    """Facts about the run that are not options."""

    session_id: int
    started_at: float
    num_train_images: int
    num_validation_images: int
    num_reg_images: int
    num_batches_per_epoch: int
    num_epochs: int
    max_train_steps: int
    seed: int
    optimizer: str
    base_model_version: str
    v2: bool
    model_name: str
    model_hashes: dict[str, str] = field(default_factory=dict)
    vae_name: str | None = None
    vae_hashes: dict[str, str] = field(default_factory=dict)


def _s(value: Any) -> str:
    return str(value)


def _subset_meta(subset: Any, count: int) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "img_count": count,
        "num_repeats": subset.num_repeats,
        "color_aug": bool(subset.color_aug),
        "flip_aug": bool(subset.flip_aug),
        "random_crop": bool(subset.random_crop),
        "shuffle_caption": bool(subset.shuffle_caption),
        "keep_tokens": subset.keep_tokens,
        "keep_tokens_separator": subset.keep_tokens_separator,
        "secondary_separator": subset.secondary_separator,
        "enable_wildcard": bool(subset.enable_wildcard),
        "caption_prefix": subset.caption_prefix,
        "caption_suffix": subset.caption_suffix,
        "resize_interpolation": subset.resize_interpolation,
    }
    if isinstance(subset, DreamBoothSubsetParams):
        meta.update(image_dir=os.path.basename(subset.image_dir or ""), class_tokens=subset.class_tokens,
                    is_reg=bool(subset.is_reg))
    elif isinstance(subset, FineTuningSubsetParams):
        meta.update(image_dir=os.path.basename(subset.image_dir or ""),
                    metadata_file=os.path.basename(subset.metadata_file))
    return meta


def _dataset_keys(args: argparse.Namespace, params: DatasetGroupParams, stats: DatasetStats,
                  num_processes: int) -> dict[str, str]:
    tag_frequency: dict[str, dict[str, int]] = {}
    dataset_dirs: dict[str, dict[str, int]] = {}
    datasets = []
    for i, ds in enumerate(params.datasets):
        counts = stats.subset_image_counts[i] if i < len(stats.subset_image_counts) else [0] * len(ds.subsets)
        tags = stats.tag_frequency[i] if i < len(stats.tag_frequency) else {}
        tag_frequency.update(tags)
        for subset, count in zip(ds.subsets, counts):
            dataset_dirs[os.path.basename(subset.image_dir or "")] = {"n_repeats": subset.num_repeats,
                                                                       "img_count": count}
        datasets.append({
            "is_dreambooth": ds.kind == "dreambooth",
            "batch_size_per_device": ds.batch_size,
            "num_train_images": stats.num_train_images[i] if i < len(stats.num_train_images) else 0,
            "num_reg_images": stats.num_reg_images[i] if i < len(stats.num_reg_images) else 0,
            "resolution": f"({ds.resolution[0]}, {ds.resolution[1]})",
            "enable_bucket": bool(ds.enable_bucket),
            "min_bucket_reso": ds.min_bucket_reso,
            "max_bucket_reso": ds.max_bucket_reso,
            "tag_frequency": tags,
            "bucket_info": stats.bucket_info[i] if i < len(stats.bucket_info) else None,
            "resize_interpolation": ds.resize_interpolation,
            "subsets": [_subset_meta(s, c) for s, c in zip(ds.subsets, counts)],
        })
    if getattr(args, "dataset_config", None):
        return {"ss_datasets": json.dumps(datasets), "ss_tag_frequency": json.dumps(tag_frequency),
                "ss_dataset_dirs": json.dumps(dataset_dirs)}
    ds = params.datasets[0]
    first = ds.subsets[0]
    train_dirs = {k: v for k, v in dataset_dirs.items()}
    reg_dirs = {}
    for subset in ds.subsets:
        key = os.path.basename(subset.image_dir or "")
        if subset.is_reg and key in train_dirs:
            reg_dirs[key] = train_dirs.pop(key)
    return {
        "ss_batch_size_per_device": _s(ds.batch_size),
        "ss_total_batch_size": _s(ds.batch_size * num_processes * args.gradient_accumulation_steps),
        "ss_resolution": _s(f"({ds.resolution[0]}, {ds.resolution[1]})"),
        "ss_color_aug": _s(bool(first.color_aug)),
        "ss_flip_aug": _s(bool(first.flip_aug)),
        "ss_random_crop": _s(bool(first.random_crop)),
        "ss_shuffle_caption": _s(bool(first.shuffle_caption)),
        "ss_enable_bucket": _s(bool(ds.enable_bucket)),
        "ss_bucket_no_upscale": _s(bool(ds.bucket_no_upscale)),
        "ss_min_bucket_reso": _s(ds.min_bucket_reso),
        "ss_max_bucket_reso": _s(ds.max_bucket_reso),
        "ss_keep_tokens": _s(first.keep_tokens),
        "ss_dataset_dirs": json.dumps(train_dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_bucket_info": json.dumps(stats.bucket_info[0] if stats.bucket_info else None),
    }


def build_lora_metadata(args: argparse.Namespace, params: DatasetGroupParams, stats: DatasetStats,
                        facts: RunFacts, *, num_processes: int) -> dict[str, str]:
    """All ``ss_*`` keys of the run (without the per-save ``ss_steps``, ``ss_epoch``,
    ``ss_training_finished_at``; see :func:`per_save_metadata`). With ``--no_metadata`` only the minimum."""
    first = params.datasets[0].subsets[0] if params.datasets and params.datasets[0].subsets else None
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    meta = {
        "ss_session_id": _s(facts.session_id),
        "ss_training_started_at": _s(facts.started_at),
        "ss_output_name": _s(g("output_name")),
        "ss_learning_rate": _s(g("learning_rate")),
        "ss_text_encoder_lr": _s(g("text_encoder_lr")),
        "ss_unet_lr": _s(g("unet_lr")),
        "ss_num_train_images": _s(facts.num_train_images),
        "ss_num_validation_images": _s(facts.num_validation_images),
        "ss_num_reg_images": _s(facts.num_reg_images),
        "ss_num_batches_per_epoch": _s(facts.num_batches_per_epoch),
        "ss_num_epochs": _s(facts.num_epochs),
        "ss_gradient_checkpointing": _s(bool(g("gradient_checkpointing"))),
        "ss_gradient_accumulation_steps": _s(g("gradient_accumulation_steps")),
        "ss_max_train_steps": _s(facts.max_train_steps),
        "ss_lr_warmup_steps": _s(g("lr_warmup_steps")),
        "ss_lr_scheduler": _s(g("lr_scheduler")),
        "ss_network_module": _s(g("network_module") or "networks.lora"),
        "ss_network_dim": _s(g("network_dim")),
        "ss_network_alpha": _s(g("network_alpha")),
        "ss_network_dropout": _s(g("network_dropout")),
        "ss_mixed_precision": _s(g("mixed_precision")),
        "ss_full_fp16": _s(bool(g("full_fp16"))),
        "ss_v2": _s(facts.v2),
        "ss_base_model_version": facts.base_model_version,
        "ss_clip_skip": _s(g("clip_skip")),
        "ss_max_token_length": _s(g("max_token_length")),
        "ss_cache_latents": _s(bool(g("cache_latents"))),
        "ss_seed": _s(facts.seed),
        "ss_lowram": _s(bool(g("lowram"))),
        "ss_noise_offset": _s(g("noise_offset")),
        "ss_multires_noise_iterations": _s(g("multires_noise_iterations")),
        "ss_multires_noise_discount": _s(g("multires_noise_discount")),
        "ss_adaptive_noise_scale": _s(g("adaptive_noise_scale")),
        "ss_zero_terminal_snr": _s(bool(g("zero_terminal_snr"))),
        "ss_training_comment": _s(g("training_comment")),
        "ss_sd_scripts_commit_hash": "",
        "ss_optimizer": facts.optimizer,
        "ss_max_grad_norm": _s(g("max_grad_norm")),
        "ss_caption_dropout_rate": _s(first.caption_dropout_rate if first else None),
        "ss_caption_dropout_every_n_epochs": _s(first.caption_dropout_every_n_epochs if first else None),
        "ss_caption_tag_dropout_rate": _s(first.caption_tag_dropout_rate if first else None),
        "ss_face_crop_aug_range": _s(first.face_crop_aug_range if first else None),
        "ss_prior_loss_weight": _s(params.datasets[0].prior_loss_weight if params.datasets else None),
        "ss_min_snr_gamma": _s(g("min_snr_gamma")),
        "ss_scale_weight_norms": _s(g("scale_weight_norms")),
        "ss_ip_noise_gamma": _s(g("ip_noise_gamma")),
        "ss_debiased_estimation": _s(bool(g("debiased_estimation_loss"))),
        "ss_noise_offset_random_strength": _s(bool(g("noise_offset_random_strength"))),
        "ss_ip_noise_gamma_random_strength": _s(bool(g("ip_noise_gamma_random_strength"))),
        "ss_loss_type": _s(g("loss_type")),
        "ss_huber_schedule": _s(g("huber_schedule")),
        "ss_huber_scale": _s(g("huber_scale")),
        "ss_huber_c": _s(g("huber_c")),
        "ss_fp8_base": _s(bool(g("fp8_base"))),
        "ss_fp8_base_unet": _s(bool(g("fp8_base_unet"))),
        "ss_validation_seed": _s(params.datasets[0].validation_seed if params.datasets else None),
        "ss_validation_split": _s(params.datasets[0].validation_split if params.datasets else None),
        "ss_max_validation_steps": _s(g("max_validation_steps")),
        "ss_validate_every_n_epochs": _s(g("validate_every_n_epochs")),
        "ss_validate_every_n_steps": _s(g("validate_every_n_steps")),
        "ss_resize_interpolation": _s(params.datasets[0].resize_interpolation if params.datasets else None),
        "ss_network_args": json.dumps(_network_args_dict(g("network_args"))),
        "ss_sd_model_name": _model_name(str(facts.model_name)),
    }
    meta.update(_dataset_keys(args, params, stats, num_processes))
    if facts.model_hashes:
        meta["ss_sd_model_hash"] = facts.model_hashes.get("legacy", "")
        meta["ss_new_sd_model_hash"] = facts.model_hashes.get("sha256", "")
    if facts.vae_name:
        meta["ss_vae_name"] = os.path.basename(facts.vae_name)
        if facts.vae_hashes:
            meta["ss_vae_hash"] = facts.vae_hashes.get("legacy", "")
            meta["ss_new_vae_hash"] = facts.vae_hashes.get("sha256", "")
    if g("no_metadata"):
        meta = {k: meta[k] for k in MINIMUM_KEYS}
    return meta


def per_save_metadata(base: dict[str, str], *, global_step: int, epoch: int, minimal: bool) -> dict[str, str]:
    """``base`` plus the keys that change with every save."""
    meta = dict(base)
    if not minimal:
        meta.update(ss_training_finished_at=_s(time.time()), ss_steps=_s(global_step), ss_epoch=_s(epoch))
    return meta


def _model_name(name: str) -> str:
    """The file or folder name of a local model; a Hub id as given (``owner/name``), as sd-scripts writes it."""
    local = os.path.expanduser(name)
    return os.path.basename(local.rstrip("/\\")) if os.path.exists(local) else name


def _network_args_dict(network_args: list[str] | None) -> dict[str, str]:
    result = {}
    for item in network_args or []:
        key, _, value = item.partition("=")
        result[key.strip()] = value.strip()
    return result


def dataset_stats(group: Any) -> DatasetStats:
    """Counts, tag frequencies (per subset folder) and bucket use of a built ``DatasetGroup``."""
    stats = DatasetStats()
    for ds in group.train:
        stats.num_train_images.append(sum(s.num_images * s.num_repeats for s in ds.subsets if not s.is_reg))
        stats.num_reg_images.append(sum(s.num_images * s.num_repeats for s in ds.subsets if s.is_reg))
        stats.subset_image_counts.append([s.num_images for s in ds.subsets])
        tags: dict[str, dict[str, int]] = {}
        for img in ds.images:
            sub = ds.subset_params[img.subset_index]
            folder = os.path.basename(sub.image_dir or "") or sub.origin
            counts = tags.setdefault(folder, {})
            for tag in img.record.caption.split(sub.caption_separator or ","):
                tag = tag.strip()
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        stats.tag_frequency.append(tags)
        if ds.params.enable_bucket:
            buckets = {i: {"resolution": list(reso), "count": len(samples)}
                       for i, (reso, samples) in enumerate(sorted(ds.buckets.items()))}
            stats.bucket_info.append({"buckets": buckets, "mean_img_ar_error": ds.mean_ar_error()})
        else:
            stats.bucket_info.append(None)
    return stats


def lora_metadata_for_run(run: Any) -> dict[str, str]:
    """The metadata of every LoRA file a run saves (``ss_*`` keys and ``modelspec.*``)."""
    from library.models.metadata import run_modelspec

    args, group, models = run.args, run.group, run.models
    family = models.family
    facts = RunFacts(
        session_id=run.seed, started_at=time.time(), num_train_images=group.num_train_images,
        num_validation_images=sum(s.num_images for d in group.validation for s in d.subsets),
        num_reg_images=group.num_reg_images,
        num_batches_per_epoch=group.batches_per_epoch(run.accelerator.num_processes),
        num_epochs=run.num_epochs, max_train_steps=run.max_train_steps, seed=run.seed,
        optimizer=run.optimizer_name, base_model_version=family.base_model_version, v2=family.ss_v2,
        model_name=getattr(args, "pretrained_model_name_or_path", None) or models.source,
        model_hashes=models.model_hashes,
        vae_name=models.vae_source, vae_hashes=models.vae_hashes if models.vae_source else {},
    )
    meta = build_lora_metadata(args, run.params, dataset_stats(group), facts,
                               num_processes=run.accelerator.num_processes)
    resolution = run.params.datasets[0].resolution if run.params.datasets else family.default_resolution
    meta.update(run_modelspec(family, args, title=run.names.name, resolution=resolution, lora=True))
    return meta
