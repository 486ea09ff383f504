"""WD14 tagger (ONNX): tags for every image of a folder, written as sidecar files or a metadata file."""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from library.errors import UserError
from library.cli import ArgumentParser, non_negative_int
from library.tools.caption_output import (CaptionSink, JsonlSink, JsonMetadataSink, SidecarSink,
                                          without_blocked)
from library.tools.hub_files import download_files
from library.tools.image_batches import (BatchReader, check_positive, find_images, open_rgb, pending_images,
                                         summary)
from library.tools.wd14_tags import (Labels, TagOptions, load_selected_tags_csv, load_tag_mapping_json,
                                     merge_tags, parse_tag_list, parse_tag_replacement, select_tags)

DEFAULT_REPO_ID = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
SMILINGWOLF_FILES = ["model.onnx", "selected_tags.csv"]
MAPPING_FILES = ["model_optimized.onnx", "tag_mapping.json"]
THRESHOLD_CATEGORIES = ("general", "character", "meta", "model", "copyright", "artist")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Tag images with a WD14 tagger (ONNX)")
    p.add_argument("train_data_dir", help="folder with the images")
    p.add_argument("--repo_id", default=DEFAULT_REPO_ID,
                   help="Hugging Face repo of the tagger; owner/name/subfolder selects the tag_mapping layout")
    p.add_argument("--model_dir", default="wd14_tagger_model",
                   help="folder for the model files: <model_dir>/<repo_id with / as _>, or the files directly")
    p.add_argument("--force_download", action="store_true", help="download the model files again")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--max_data_loader_n_workers", type=non_negative_int, default=None, help="threads that read images")
    p.add_argument("--output_path", default=None,
                   help="write a metadata .json or .jsonl instead of one tag file per image")
    p.add_argument("--caption_extension", default=".txt")
    p.add_argument("--caption_extention", default=None, help=argparse.SUPPRESS)
    p.add_argument("--thresh", type=float, default=0.35, help="threshold of every category not given its own")
    for category in THRESHOLD_CATEGORIES:
        p.add_argument(f"--{category}_threshold", type=float, default=None,
                       help=f"threshold of {category} tags (default --thresh; above 1 disables them)")
    p.add_argument("--recursive", action="store_true")
    p.add_argument("--remove_underscore", action="store_true", help="write tags longer than 3 chars with spaces")
    p.add_argument("--debug", action="store_true", help="print the tags of every image")
    p.add_argument("--undesired_tags", default="", help="tags never written, separated like --caption_separator")
    p.add_argument("--frequency_tags", action="store_true", help="print how often each tag was written")
    p.add_argument("--onnx", action="store_true", help="accepted for compatibility; the tagger always uses ONNX")
    p.add_argument("--append_tags", action="store_true", help="add new tags to an existing tag file or entry")
    p.add_argument("--overwrite", action="store_true", help="replace existing tag files or entries")
    p.add_argument("--use_rating_tags", action="store_true", help="put the rating tag first")
    p.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="put the rating tag last")
    p.add_argument("--use_quality_tags", action="store_true", help="put the quality tag first (tag_mapping)")
    p.add_argument("--use_quality_tags_as_last_tag", action="store_true", help="put the quality tag last")
    p.add_argument("--character_tags_first", action="store_true")
    p.add_argument("--always_first_tags", default=None, help="tags put first when present, in the given order")
    p.add_argument("--caption_separator", default=", ")
    p.add_argument("--tag_replacement", default=None, help="'src1,dst1;src2,dst2' (\\, and \\; escape)")
    p.add_argument("--character_tag_expand", action="store_true", help="name_(series) -> name, series")
    return p


def tag_options(args: argparse.Namespace) -> TagOptions:
    if args.use_rating_tags and args.use_rating_tags_as_last_tag:
        raise UserError("--use_rating_tags and --use_rating_tags_as_last_tag exclude each other; choose one")
    if args.use_quality_tags and args.use_quality_tags_as_last_tag:
        raise UserError("--use_quality_tags and --use_quality_tags_as_last_tag exclude each other; choose one")
    thresholds = {c: getattr(args, f"{c}_threshold") for c in THRESHOLD_CATEGORIES}
    thresholds = {c: args.thresh if t is None else t for c, t in thresholds.items()}
    sep = args.caption_separator
    return TagOptions(
        thresholds=thresholds,
        remove_underscore=args.remove_underscore,
        undesired=set(parse_tag_list(args.undesired_tags, sep)),
        replacement=parse_tag_replacement(args.tag_replacement),
        character_tag_expand=args.character_tag_expand,
        character_tags_first=args.character_tags_first,
        rating="first" if args.use_rating_tags else "last" if args.use_rating_tags_as_last_tag else None,
        quality="first" if args.use_quality_tags else "last" if args.use_quality_tags_as_last_tag else None,
        always_first=parse_tag_list(args.always_first_tags, sep),
    )


@dataclass(frozen=True)
class TaggerFiles:
    model: Path
    labels: Path

    @property
    def mapping_layout(self) -> bool:
        return self.labels.name == "tag_mapping.json"


def _complete(folder: Path, names: list[str]) -> bool:
    return all((folder / n).is_file() for n in names)


def locate_model(repo_id: str, model_dir: str | Path, force_download: bool = False) -> TaggerFiles:
    """Find the tagger files (``model_dir`` itself or ``model_dir/<repo_id with _>``), downloading when asked
    or when they are missing and the hub is reachable."""
    parts = repo_id.strip("/").split("/")
    if len(parts) not in (2, 3):
        raise UserError(f"--repo_id {repo_id!r} must be owner/name or owner/name/subfolder")
    names = MAPPING_FILES if len(parts) == 3 else SMILINGWOLF_FILES
    model_dir = Path(model_dir)
    if not force_download:
        for folder in (model_dir, model_dir / repo_id.replace("/", "_")):
            for layout in (names, SMILINGWOLF_FILES, MAPPING_FILES):
                if _complete(folder, layout):
                    return TaggerFiles(folder / layout[0], folder / layout[1])
    folder = model_dir / repo_id.replace("/", "_")
    download_files("/".join(parts[:2]), names, folder, subfolder=parts[2] if len(parts) == 3 else None,
                   force=force_download)
    return TaggerFiles(folder / names[0], folder / names[1])


def preprocess(image: Image.Image, size: int, nchw: bool) -> np.ndarray:
    """Pad to a white square (centred), resize to ``size`` (area when shrinking, Lanczos when enlarging),
    BGR float32. SmilingWolf models take NHWC 0..255; tag_mapping models take NCHW scaled to -1..1."""
    w, h = image.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BOX if side > size else Image.Resampling.LANCZOS)
    array = np.asarray(square, dtype=np.float32)[:, :, ::-1]
    if nchw:
        return np.ascontiguousarray(array.transpose(2, 0, 1)) / 127.5 - 1.0
    return np.ascontiguousarray(array)


class OnnxTagger:
    """An ONNX tagger session with its labels."""

    def __init__(self, files: TaggerFiles):
        import onnxruntime as ort

        self.labels: Labels = load_tag_mapping_json(files.labels) if files.mapping_layout \
            else load_selected_tags_csv(files.labels)
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "ROCMExecutionProvider", "CPUExecutionProvider")
                     if p in available]
        try:
            self.session = ort.InferenceSession(str(files.model), providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise UserError(f"{files.model}: cannot be loaded as an ONNX model ({err}); delete it and download "
                            "it again (--force_download)") from err
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.nchw = files.mapping_layout
        shape = inp.shape
        if len(shape) != 4:
            raise UserError(f"{files.model}: expected an image input of 4 dimensions, got {shape}")
        size = shape[2] if self.nchw else shape[1]
        self.size = size if isinstance(size, int) and size > 0 else 448
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: batch})[0]
        if self.labels.logits:
            out = 1.0 / (1.0 + np.exp(-out))
        return out


def _sink(args: argparse.Namespace) -> CaptionSink:
    if args.output_path is None:
        return SidecarSink(args.caption_extention or args.caption_extension)
    suffix = Path(args.output_path).suffix.lower()
    if suffix == ".json":
        return JsonMetadataSink(args.output_path, text_key="tags")
    if suffix == ".jsonl":
        return JsonlSink(args.output_path, text_key="caption", option="--output_path")
    raise UserError(f"--output_path {args.output_path}: the name must end in .json or .jsonl")


def run(args: argparse.Namespace) -> None:
    check_positive("--batch_size", args.batch_size)
    opts = tag_options(args)
    images = find_images(args.train_data_dir, args.recursive)
    sink = _sink(args)
    images, blocked = without_blocked(images, sink)
    for line in blocked:
        print(f"skipping {line}")
    todo, skipped = pending_images(images, lambda p: sink.existing(p) is not None,
                                   args.overwrite or args.append_tags)
    if not todo:
        sink.close()
        print(summary(0, skipped, [], "tag files", blocked=len(blocked)))
        return
    tagger = OnnxTagger(locate_model(args.repo_id, args.model_dir, args.force_download))
    batch_size = args.batch_size
    if tagger.fixed_batch is not None and tagger.fixed_batch != batch_size:
        print(f"the model takes batches of exactly {tagger.fixed_batch}; using that instead of --batch_size")
        batch_size = tagger.fixed_batch

    def load(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        image = open_rgb(path, background=(255, 255, 255))
        return preprocess(image, tagger.size, tagger.nchw), image.size

    reader = BatchReader(load, batch_size, workers=args.max_data_loader_n_workers or 2)
    frequency: Counter[str] = Counter()
    written = 0
    sep = args.caption_separator
    try:
        with tqdm(total=len(todo), desc="tagging", unit="img") as bar:
            for batch in reader.batches(todo, bar):
                arrays = np.stack([item.data for item in batch])
                if tagger.fixed_batch is not None and len(batch) < tagger.fixed_batch:
                    pad = np.repeat(arrays[-1:], tagger.fixed_batch - len(batch), axis=0)
                    arrays = np.concatenate([arrays, pad])
                probs = tagger(arrays)
                for item, prob in zip(batch, probs):
                    tags = select_tags(prob, tagger.labels, opts)
                    final = tags["all"]
                    old = sink.existing(item.path) if args.append_tags else None
                    if old:
                        final = merge_tags(old, final, sep)
                    sink.write(item.path, sep.join(final), {"image_size": list(item.size)})
                    frequency.update(final)
                    written += 1
                    if args.debug:
                        tqdm.write(f"{item.path}: rating [{sep.join(tags.get('rating', []))}] character "
                                   f"[{sep.join(tags.get('character', []))}] general "
                                   f"[{sep.join(tags.get('general', []))}]")
                bar.update(len(batch))
    finally:
        sink.close()
    if args.frequency_tags:
        print("tag frequencies:")
        for tag, count in sorted(frequency.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {tag}: {count}")
    print(summary(written, skipped, reader.failed, "tag files" if args.output_path is None else "entries",
                  blocked=len(blocked)))
