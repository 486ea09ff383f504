"""``finetune/prepare_buckets_latents.py``: bucket the images of a folder and cache their latents ahead of training.

Nothing here re-implements bucketing or the latent cache: the images are turned into a one-subset fine-tuning
dataset and :meth:`library.dataset.group.DatasetGroup.cache_latents` writes the same ``.npz`` entries (with the
same ``cache_key`` as training, :func:`library.training.preparation.vae_cache_key`) that ``fine_tune.py`` and
``train_network.py`` would write with ``--cache_latents_to_disk``. Training with the same VAE, precision,
resolution, bucket options, ``flip_aug`` and ``alpha_mask`` therefore finds every entry valid and encodes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from library.dataset.image_files import IMAGE_EXTENSIONS, list_images
from library.dataset.records import resolve_image_key
from library.cli import ArgumentParser, non_negative_int
from library.errors import UserError
from library.io_utils import check_output_file
from library.models.families.latents import add_latent_flags, latent_family
from library.precision import dtype_of
from library.tools.metadata_files import image_keys, load_metadata, save_metadata

_MAX_LISTED = 10


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="prepare_buckets_latents.py",
        description="Assign every image of a folder to an aspect-ratio bucket, write its latents (.npz beside "
                    "the image, the training latent cache) and its bucket as train_resolution into the metadata.",
    )
    p.add_argument("train_data_dir", help="folder with the training images")
    p.add_argument("in_json", help="metadata file to read (not modified unless it is also out_json)")
    p.add_argument("out_json", help="metadata file to write, with train_resolution [w, h] for every image")
    p.add_argument("model_name_or_path", help="model whose VAE encodes the images: a diffusers folder, a "
                   ".safetensors/.ckpt checkpoint, a VAE file or folder, or a cached Hugging Face id")
    p.add_argument("--v2", action="store_true", help="the model is Stable Diffusion 2.x")
    add_latent_flags(p)
    p.add_argument("--batch_size", type=int, default=1, help="images per VAE batch (default 1)")
    p.add_argument("--max_data_loader_n_workers", type=non_negative_int, default=None,
                   help="threads reading image headers (default: automatic)")
    p.add_argument("--max_resolution", default=None,
                   help='training resolution "width,height" (or one number for a square; default the family\'s: '
                        '"512,512" for SD1.x/2.x, "1024,1024" for SDXL, SD3, FLUX.1 and Lumina)')
    p.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side (default 256)")
    p.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side (default 1024)")
    p.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket side step (default 64)")
    p.add_argument("--bucket_no_upscale", action="store_true", help="never enlarge images (buckets follow them)")
    p.add_argument("--mixed_precision", choices=["bf16", "fp16", "no"], default="no",
                   help="VAE precision; use the one training's VAE runs in (default no = float32)")
    p.add_argument("--full_path", action="store_true", help="key new metadata entries by the full image path")
    p.add_argument("--flip_aug", action="store_true", help="also cache the latents of the mirrored image")
    p.add_argument("--alpha_mask", action="store_true", help="also store the alpha channel as a loss mask")
    p.add_argument("--skip_existing", action="store_true",
                   help="keep latents that are still valid (same image, VAE, precision and bucket)")
    p.add_argument("--recursive", action="store_true", help="also take images in subfolders")
    return p


def parse_max_resolution(text: str) -> tuple[int, int]:
    """``"W,H"`` or ``"N"`` as (width, height)."""
    parts = [s.strip() for s in str(text).split(",")]
    try:
        values = [int(s) for s in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise UserError(f'--max_resolution "{text}": expected "width,height" in pixels, e.g. "512,512" or "512,768"')
    return values[0], values[1]


@dataclass
class MatchedImages:
    """How the images of the folder and the metadata entries line up."""

    keys: dict[Path, str]  # image -> metadata key (existing, or new for images not in the metadata)
    not_in_metadata: list[Path]
    missing: list[str]  # metadata keys whose image does not exist
    elsewhere: list[str]  # metadata keys of existing images outside what was scanned (kept unchanged)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def match_images(metadata: dict[str, Any], images: list[Path], root: Path, full_path: bool) -> MatchedImages:
    """The metadata key of each image: an existing key that training resolves to that image, else a new one.

    New keys are the absolute path (``--full_path``) or the path relative to ``root`` without its extension.
    """
    preferred = image_keys(images, root, False)
    keys: dict[Path, str] = {}
    not_in_metadata: list[Path] = []
    for image in images:
        rel = image.relative_to(root)
        candidates = (str(image.resolve()), str(image), preferred[image], rel.as_posix(),
                      rel.with_suffix("").as_posix())
        key = next((c for c in candidates if c in metadata and _resolves_to(c, root, image)), None)
        if key is None:
            not_in_metadata.append(image)
            key = str(image.resolve()) if full_path else preferred[image]
        keys[image] = key
    used = set(keys.values())
    missing, elsewhere = [], []
    for key in metadata:
        if key in used:
            continue
        (elsewhere if resolve_image_key(key, root) is not None else missing).append(key)
    return MatchedImages(keys, not_in_metadata, missing, elsewhere)


def _resolves_to(key: str, root: Path, image: Path) -> bool:
    found = resolve_image_key(key, root)
    return found is not None and _same_file(found, image)


def dataset_params(args: argparse.Namespace, metadata_file: Path, resolution: str | None = None):
    """The one-dataset, one-subset fine-tuning configuration training uses with the same options."""
    from library.config.params import DatasetGroupParams, DatasetParams, FineTuningSubsetParams

    subset = FineTuningSubsetParams(origin=f"{args.train_data_dir}", metadata_file=str(metadata_file),
                                    flip_aug=args.flip_aug, alpha_mask=args.alpha_mask)
    dataset = DatasetParams(
        origin="prepare_buckets_latents.py", kind="finetuning", subsets=[subset],
        resolution=parse_max_resolution(resolution or args.max_resolution or "512,512"), batch_size=max(1, args.batch_size), enable_bucket=True,
        min_bucket_reso=args.min_bucket_reso, max_bucket_reso=args.max_bucket_reso,
        bucket_reso_steps=args.bucket_reso_steps, bucket_no_upscale=args.bucket_no_upscale,
    )
    return DatasetGroupParams(datasets=[dataset], source=str(args.in_json))


def model_path(name: str) -> Path:
    """A local file or folder, or the cached snapshot of a Hugging Face id (checked before anything loads)."""
    from library.models.loading import resolve_model_path

    path = Path(name).expanduser()
    return path if path.exists() else resolve_model_path(name)


def load_latent_vae(path: Path, family: Any, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Only the VAE in ``path``, loaded as training loads it (float32, then cast to ``dtype``)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    vae = family.spec.load_latent_vae(path, family)
    vae.set_attn_processor(AttnProcessor2_0())
    vae.requires_grad_(False)
    vae.eval()
    return vae.to(device, dtype)


class CountingEncoder:
    """Wraps the VAE encoder to count the images it encodes (flipped passes included)."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor]):
        self.encode = encode
        self.images = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += images.shape[0]
        return self.encode(images)


@dataclass
class PrepareResult:
    """What :func:`prepare_buckets_latents` did."""

    buckets: dict[tuple[int, int], int]  # bucket (w, h) -> images
    mean_ar_error: float
    encoded: int  # images encoded now
    reused: int  # images whose valid latents were kept (--skip_existing)
    matched: MatchedImages
    skipped: list[str] = field(default_factory=list)  # unreadable or too-small images


def _check_paths(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    root = Path(args.train_data_dir)
    if not root.is_dir():
        raise UserError(f"train_data_dir '{root}': folder not found")
    in_json, out_json = Path(args.in_json), Path(args.out_json)
    if in_json.suffix.lower() == ".jsonl":
        raise UserError(f"in_json '{in_json}': JSONL metadata is not supported by this tool; give a .json metadata "
                        "file (as written by merge_captions_to_metadata.py)")
    if not out_json.parent.is_dir():
        raise UserError(f"out_json '{out_json}': folder '{out_json.parent}' does not exist; create it first")
    check_output_file(out_json, "out_json", overwrite=True, example="meta_lat.json")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be at least 1")
    if args.max_resolution is not None:
        parse_max_resolution(args.max_resolution)
    return root, in_json, out_json


def prepare_buckets_latents(args: argparse.Namespace) -> PrepareResult:
    """Check everything, bucket the images, cache their latents, then write ``out_json`` atomically."""
    from library.dataset.group import build_dataset_group
    from library.training.preparation import make_vae_encoder, uses_cuda, vae_cache_key

    root, in_json, out_json = _check_paths(args)
    metadata = load_metadata(in_json)
    images = list_images(root, recursive=args.recursive)
    if not images:
        where = "in or below" if args.recursive else "in"
        raise UserError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) {where} '{root}'"
                        + ("" if args.recursive else "; add --recursive for images in subfolders"))
    matched = match_images(metadata, images, root, args.full_path)
    model = model_path(args.model_name_or_path)
    family = latent_family(args, model)
    side = family.default_resolution
    by_path = {image.resolve(): key for image, key in matched.keys.items()}

    with tempfile.TemporaryDirectory(prefix="prepare_latents_") as tmp:
        work_meta = Path(tmp) / "metadata.json"
        entries = {str(p): {k: v for k, v in metadata.get(key, {}).items() if k == "image_size"}
                   for p, key in by_path.items()}
        work_meta.write_text(json.dumps(entries), encoding="utf-8")
        try:
            group = build_dataset_group(dataset_params(args, work_meta, args.max_resolution or f"{side},{side}"),
                                        seed=0, max_workers=args.max_data_loader_n_workers,
                                        required_step=family.bucket_step)
        except UserError as err:
            if str(work_meta) not in err.message:  # not about the working copy: bucket options etc.
                raise
            raise UserError(f"no usable image in '{root}': every image was skipped (listed above); re-export or "
                            "remove them") from None
    dataset = group.train[0]
    processed = {img.record.path for img in dataset.images}
    matched.not_in_metadata = [p for p in matched.not_in_metadata if p.resolve() in processed]

    device = torch.device("cuda" if uses_cuda() else "cpu")
    dtype = dtype_of(args.mixed_precision)
    vae = load_latent_vae(model, family, device=device, dtype=dtype)
    encoder = CountingEncoder(make_vae_encoder(vae, device, dtype))
    group.cache_latents(encoder, cache_key=vae_cache_key(vae, dtype), to_disk=True, batch_size=args.batch_size,
                        recompute=not args.skip_existing, family_suffix=family.cache_suffix)
    encoded = encoder.images // (2 if args.flip_aug else 1)

    out = {key: dict(value) for key, value in metadata.items()}
    for img in dataset.images:
        key = by_path[img.record.path]
        out.setdefault(key, {})["train_resolution"] = list(img.choice.bucket)
    save_metadata(out_json, out)
    return PrepareResult(
        buckets={b: len(v) for b, v in dataset.buckets.items()}, mean_ar_error=dataset.mean_ar_error(),
        encoded=encoded, reused=len(dataset.images) - encoded, matched=matched, skipped=list(group.skipped),
    )


def _listing(items: list[str]) -> str:
    shown = "".join(f"\n  {s}" for s in items[:_MAX_LISTED])
    return shown + (f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def format_report(result: PrepareResult, args: argparse.Namespace) -> str:
    """The summary printed at the end: problems first, then the bucket histogram."""
    lines: list[str] = []
    m = result.matched
    if m.missing:
        lines.append(f"warning: {len(m.missing)} entr{'y' if len(m.missing) == 1 else 'ies'} of {args.in_json} "
                     f"ha{'s' if len(m.missing) == 1 else 've'} no image in '{args.train_data_dir}' "
                     f"(kept unchanged in {args.out_json}):{_listing(m.missing)}")
    if m.not_in_metadata:
        lines.append(f"warning: {len(m.not_in_metadata)} image(s) in '{args.train_data_dir}' had no entry in "
                     f"{args.in_json}; added with train_resolution only (they train with an empty caption unless "
                     f"you merge captions or tags for them):{_listing([str(p) for p in m.not_in_metadata])}")
    if m.elsewhere:
        lines.append(f"{len(m.elsewhere)} entr{'y' if len(m.elsewhere) == 1 else 'ies'} for images outside the "
                     f"scanned folder{'' if args.recursive else ' (or in its subfolders: add --recursive)'} "
                     "kept unchanged")
    if result.skipped:
        lines.append(f"warning: {len(result.skipped)} image(s) skipped (no latents, no train_resolution):"
                     f"{_listing(result.skipped)}")
    total = sum(result.buckets.values())
    lines.append(f"buckets ({len(result.buckets)}, {total} images):")
    lines += [f"  {w}x{h}: {n}" for (w, h), n in sorted(result.buckets.items())]
    lines.append(f"mean aspect ratio error: {result.mean_ar_error:.4f}")
    kept = f", {result.reused} already up to date" if args.skip_existing else ""
    lines.append(f"latents: {result.encoded} image(s) encoded{kept}; wrote {args.out_json}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = prepare_buckets_latents(args)
    print(format_report(result, args), file=sys.stdout)
    return 0
