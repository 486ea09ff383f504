"""Resolved dataset parameters: what the dataset config validator produces and the dataset code consumes.

Every field has its final value (precedence subset > dataset > general > command line > default already
applied). ``origin`` names the place in the user's terms (``datasets[0].subsets[1]``, or
``--train_data_dir 10_sks dog`` for old-style folders) so later errors can point at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class DatasetSupport:
    """Which dataset styles a script accepts (the seeds' table of scripts vs. dataset styles)."""

    dreambooth: bool = True
    finetuning: bool = True
    caption_dropout: bool = True
    script: str = "train_network.py"


@dataclass
class SubsetParams:
    """Options shared by DreamBooth and fine-tuning subsets."""

    origin: str
    image_dir: str | None = None
    num_repeats: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    random_crop: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0  # < 1: a ratio of max_train_steps
    custom_attributes: dict[str, Any] = field(default_factory=dict)
    resize_interpolation: str | None = None  # None: area when shrinking, lanczos when enlarging
    alpha_mask: bool = False
    is_reg: bool = False


@dataclass
class DreamBoothSubsetParams(SubsetParams):
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    cache_info: bool = False


@dataclass
class FineTuningSubsetParams(SubsetParams):
    metadata_file: str = ""


@dataclass
class DatasetParams:
    origin: str
    kind: Literal["dreambooth", "finetuning"]
    subsets: list[SubsetParams]
    resolution: tuple[int, int] = (512, 512)  # (width, height)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_split: float = 0.0
    validation_seed: int | None = None
    resize_interpolation: str | None = None
    prior_loss_weight: float = 1.0
    debug_dataset: bool = False


@dataclass
class DatasetGroupParams:
    """All datasets of a run, plus where they came from (a config file path, or the command line)."""

    datasets: list[DatasetParams]
    source: str
    skipped: list[str] = field(default_factory=list)  # human-readable notes: duplicate subsets etc.
