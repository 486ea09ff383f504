"""Command-line options for datasets and config files (names and defaults as in sd-scripts).

Scripts build their parser from these groups, then call
:func:`library.config.run_config.load_run_config` and
:func:`library.config.dataset_config.resolve_dataset_params`.
"""

from __future__ import annotations

import argparse
from types import MappingProxyType
from typing import Mapping

from library.cli import non_negative_int
from library.config.params import DatasetSupport

# The seeds' table of scripts vs. dataset styles: fine_tune.py takes only fine-tuning (metadata) datasets,
# train_db.py only DreamBooth folders, train_network.py both. All three support caption dropout.
SUPPORT_TRAIN_NETWORK = DatasetSupport(dreambooth=True, finetuning=True, caption_dropout=True,
                                       script="train_network.py")
SUPPORT_TRAIN_DB = DatasetSupport(dreambooth=True, finetuning=False, caption_dropout=True, script="train_db.py")
SUPPORT_FINE_TUNE = DatasetSupport(dreambooth=False, finetuning=True, caption_dropout=True, script="fine_tune.py")
# sd-scripts' sdxl_train.py takes both styles (fine-tuning metadata and DreamBooth folders)
SUPPORT_SDXL_TRAIN = DatasetSupport(dreambooth=True, finetuning=True, caption_dropout=True, script="sdxl_train.py")
SUPPORT_FLUX_TRAIN = DatasetSupport(dreambooth=True, finetuning=True, caption_dropout=True, script="flux_train.py")
SUPPORT_LUMINA_TRAIN = DatasetSupport(dreambooth=True, finetuning=True, caption_dropout=True, script="lumina_train.py")

SUPPORT_BY_SCRIPT: Mapping[str, DatasetSupport] = MappingProxyType(
    {s.script: s for s in (SUPPORT_TRAIN_NETWORK, SUPPORT_TRAIN_DB, SUPPORT_FINE_TUNE)})

RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


def parse_resolution(text: str) -> tuple[int, int]:
    """``"512"`` -> (512, 512); ``"512,768"`` -> (512, 768) as (width, height)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts) or any(int(p) <= 0 for p in parts):
        raise ValueError("resolution must be 'SIZE' or 'WIDTH,HEIGHT' with positive integers "
                         f"(e.g. 512 or 512,768), got {text!r}")
    w = int(parts[0])
    h = int(parts[-1])
    return (w, h)


def parse_float_range(text: str) -> tuple[float, float]:
    """``"2.0,4.0"`` -> (2.0, 4.0)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        return (float(parts[0]), float(parts[1]))
    except ValueError:
        raise ValueError(f"expected two numbers 'LOW,HIGH' like 2.0,4.0, got {text!r}") from None


def _checked_text(parse):
    """An argparse type that validates the text with ``parse`` but keeps the string (as sd-scripts does)."""

    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text

    check.__name__ = parse.__name__.replace("parse_", "")
    return check


resolution_arg = _checked_text(parse_resolution)
float_range_arg = _checked_text(parse_float_range)


def add_dataset_arguments(parser: argparse.ArgumentParser, support: DatasetSupport) -> None:
    """Dataset options of sd-scripts' ``add_dataset_arguments`` and the dataset-related training options."""
    g = parser.add_argument_group("dataset")
    g.add_argument("--dataset_config", type=str, default=None,
                   help="dataset config (.toml or .json); replaces --train_data_dir/--reg_data_dir/--in_json")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="folder of '<repeats>_<identifier> <class>' subfolders (DreamBooth) or images (with --in_json)")
    if support.dreambooth:
        g.add_argument("--reg_data_dir", type=str, default=None,
                       help="folder of '<repeats>_<class>' subfolders with regularization images")
        g.add_argument("--cache_info", action="store_true",
                       help="cache image sizes and captions in metadata_cache.json (DreamBooth only)")
    if support.finetuning:
        g.add_argument("--in_json", type=str, default=None, help="metadata file (fine-tuning style)")
        g.add_argument("--dataset_repeats", type=int, default=1, help="repeats of the dataset (num_repeats)")
    g.add_argument("--resolution", type=resolution_arg, default=None,
                   help="training resolution: 'SIZE' or 'WIDTH,HEIGHT' (e.g. 512 or 512,768)")
    g.add_argument("--train_batch_size", type=int, default=1, help="batch size (batch_size in dataset configs)")
    g.add_argument("--caption_extension", type=str, default=".caption", help="extension of caption files")
    g.add_argument("--caption_extention", type=str, default=None,
                   help="old misspelling of --caption_extension, still accepted")
    g.add_argument("--shuffle_caption", action="store_true", help="shuffle the separated tags of captions")
    g.add_argument("--caption_separator", type=str, default=",", help="separator of caption tags")
    g.add_argument("--keep_tokens", type=int, default=0, help="keep this many leading tags unshuffled")
    g.add_argument("--keep_tokens_separator", type=str, default="",
                   help="separator marking the fixed parts of a caption (e.g. '|||')")
    g.add_argument("--secondary_separator", type=str, default=None,
                   help="separator joining parts that shuffle/drop as one tag (e.g. ';;;')")
    g.add_argument("--enable_wildcard", action="store_true", help="enable {a|b} wildcards and multi-line captions")
    g.add_argument("--caption_prefix", type=str, default=None, help="text added before every caption")
    g.add_argument("--caption_suffix", type=str, default=None, help="text added after every caption")
    g.add_argument("--color_aug", action="store_true", help="color augmentation")
    g.add_argument("--flip_aug", action="store_true", help="horizontal flip augmentation")
    g.add_argument("--face_crop_aug_range", type=float_range_arg, default=None,
                   help="face-centered crop augmentation range 'LOW,HIGH' (e.g. 2.0,4.0)")
    g.add_argument("--random_crop", action="store_true", help="random instead of center crop")
    g.add_argument("--enable_bucket", action="store_true", help="aspect ratio bucketing")
    g.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side")
    g.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side")
    g.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket side step")
    g.add_argument("--bucket_no_upscale", action="store_true", help="never upscale images to fill a bucket")
    if support.caption_dropout:
        g.add_argument("--caption_dropout_rate", type=float, default=0.0, help="rate of training without caption")
        g.add_argument("--caption_dropout_every_n_epochs", type=int, default=0,
                       help="train without captions every N epochs")
        g.add_argument("--caption_tag_dropout_rate", type=float, default=0.0, help="rate of dropping each tag")
    g.add_argument("--token_warmup_min", type=int, default=1, help="tags used at the start of token warmup")
    g.add_argument("--token_warmup_step", type=float, default=0,
                   help="steps to reach all tags (< 1: a ratio of max_train_steps)")
    g.add_argument("--alpha_mask", action="store_true", help="use the image alpha channel as loss mask")
    g.add_argument("--resize_interpolation", type=str, default=None, choices=RESIZE_INTERPOLATIONS,
                   help="interpolation for resizing (default: area to shrink, lanczos to enlarge)")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularization images")
    g.add_argument("--debug_dataset", action="store_true", help="show the training data instead of training")
    g.add_argument("--max_data_loader_n_workers", type=non_negative_int, default=8, help="data loader worker processes")
    g.add_argument("--persistent_data_loader_workers", action="store_true",
                   help="keep data loader workers between epochs")
    g.add_argument("--validation_split", type=float, default=0.0, help="fraction of images held out for validation")
    g.add_argument("--validation_seed", type=int, default=None, help="seed of the validation split")


def add_config_file_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config_file`` (a whole-run TOML) and ``--output_config``."""
    g = parser.add_argument_group("config file")
    g.add_argument("--config_file", type=str, default=None,
                   help="TOML file with options (keys are option names without '--'); command line overrides it")
    g.add_argument("--output_config", action="store_true",
                   help="write the options given on the command line to --config_file and exit")


def dataset_parser(support: DatasetSupport) -> argparse.ArgumentParser:
    """A parser holding only the dataset options (used to know their defaults)."""
    parser = argparse.ArgumentParser(prog=support.script, add_help=False)
    add_dataset_arguments(parser, support)
    return parser
