"""Image loading and per-sample transforms: resize, bucket crop, face crop, colour augmentation, flip, tensors.

Images are numpy ``uint8`` arrays, H x W x 3 (RGB) or H x W x 4 (RGBA), until :func:`to_tensor`. Resizing
uses PIL only (no OpenCV). Random choices use the ``random.Random`` passed in, so a sample is reproducible
from the loader's seed.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from PIL import Image

from library.dataset.buckets import BucketChoice
from library.errors import UserError

_FILTERS = MappingProxyType({
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
})
INTERPOLATIONS = tuple(_FILTERS)
_EXIF_ORIENTATION = 0x0112
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)
_TRANSPOSES = MappingProxyType({
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
})
_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
HUE_SHIFT_LIMIT = 8.0  # in OpenCV hue units (0..180), i.e. +-16 degrees, as sd-scripts
GAMMA_RANGE = (0.95, 1.05)
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageReadError(UserError):
    """An image file that cannot be read (missing, corrupt, not an image)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot read image {path}: {reason}; re-export the file or remove it from the dataset")
        self.path = str(path)


def load_image(path: str | Path, with_alpha: bool = False) -> np.ndarray:
    """An image as H x W x 3 RGB (or H x W x 4 RGBA with ``with_alpha``) ``uint8``, EXIF orientation applied."""
    try:
        with Image.open(path) as opened:
            transpose = _TRANSPOSES.get(_orientation(opened))
            image = opened.transpose(transpose) if transpose is not None else opened
            if image.mode in _HIGH_BIT_DEPTH_MODES:
                image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257.0).round().astype(np.uint8), "L")
            mode = "RGBA" if with_alpha else "RGB"
            if image.mode != mode:
                image = image.convert(mode)
            return np.array(image, dtype=np.uint8)
    except _READ_ERRORS as err:
        raise ImageReadError(path, str(err) or type(err).__name__) from err


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file header, as :func:`load_image` will return it (EXIF rotation applied)."""
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if _orientation(opened) in _ROTATED_ORIENTATIONS:
                width, height = height, width
            return width, height
    except _READ_ERRORS as err:
        raise ImageReadError(path, str(err) or type(err).__name__) from err


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag; None when absent or when the EXIF block is unreadable (pixels are fine)."""
    try:
        return image.getexif().get(_EXIF_ORIENTATION)
    except (SyntaxError, ValueError, TypeError, KeyError, OSError, struct.error):
        return None


def check_interpolation(name: str | None) -> None:
    """Raise :class:`UserError` for an unknown ``resize_interpolation`` name."""
    if name is not None and name not in _FILTERS:
        raise UserError(f"unknown resize_interpolation {name!r}; use one of: {', '.join(INTERPOLATIONS)}")


def resize_image(img: np.ndarray, size: tuple[int, int], interpolation: str | None = None) -> np.ndarray:
    """Resize to ``size`` = (width, height).

    ``interpolation`` None: area averaging when neither side grows, lanczos otherwise (as sd-scripts).
    A named one is used both ways. Alpha is resized separately, so colours under transparent pixels are
    kept (no premultiplication).
    """
    check_interpolation(interpolation)
    height, width = img.shape[:2]
    if (width, height) == tuple(size):
        return img
    if interpolation is None:
        interpolation = "area" if width >= size[0] and height >= size[1] else "lanczos"
    size = (int(size[0]), int(size[1]))
    if img.ndim == 3 and img.shape[2] == 4:
        rgb = _resize_pil(Image.fromarray(np.ascontiguousarray(img[..., :3])), size, interpolation)
        alpha = _resize_pil(Image.fromarray(np.ascontiguousarray(img[..., 3])), size, interpolation)
        return np.dstack([np.asarray(rgb), np.asarray(alpha)])
    return np.array(_resize_pil(Image.fromarray(img), size, interpolation))


def _resize_pil(image: Image.Image, size: tuple[int, int], interpolation: str) -> Image.Image:
    resample = _FILTERS[interpolation]
    width, height = image.size
    if resample == Image.Resampling.BOX and width % size[0] == 0 and height % size[1] == 0:
        # Integer factors: one-pass block means (PIL's separable BOX rounds in between, off by one).
        return image.reduce((width // size[0], height // size[1]))
    return image.resize(size, resample)


def fit_to_bucket(
    img: np.ndarray,
    choice: BucketChoice,
    *,
    random_crop: bool,
    rng: random.Random | None = None,
    interpolation: str | None = None,
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Resize to ``choice.resized`` and crop to ``choice.bucket`` (centred, or at a random offset).

    Returns the image and ``crop_ltrb``: the kept box (left, top, right, bottom) in resized-image pixels.
    With ``random_crop`` one ``rng.randint`` is drawn for the width overhang, then one for the height.
    """
    img = resize_image(img, choice.resized, interpolation)
    height, width = img.shape[:2]
    bucket_w, bucket_h = choice.bucket
    left = _offset(width - bucket_w, random_crop, rng)
    top = _offset(height - bucket_h, random_crop, rng)
    cropped = img[top : top + bucket_h, left : left + bucket_w]
    if cropped.shape[:2] != (bucket_h, bucket_w):
        raise ValueError(f"resized size {width}x{height} is smaller than bucket {bucket_w}x{bucket_h}")
    return cropped, (left, top, left + bucket_w, top + bucket_h)


def _offset(overhang: int, random_crop: bool, rng: random.Random | None) -> int:
    if overhang <= 0:
        return 0
    if not random_crop:
        return overhang // 2
    if rng is None:
        raise ValueError("random_crop needs an rng")
    return rng.randint(0, overhang)


@dataclass(frozen=True)
class FaceBox:
    """Face centre and size in original-image pixels, from a ``<name>_<cx>_<cy>_<w>_<h>`` file name."""

    cx: int
    cy: int
    width: int
    height: int


def parse_face_box(path: str | Path) -> FaceBox | None:
    """The face box encoded in the file name, or None when the name carries none."""
    tokens = Path(path).stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, width, height = (int(t) for t in tokens[-4:])
    except ValueError:
        return None
    if cx <= 0 or width <= 0 or height <= 0:
        return None
    return FaceBox(cx, cy, width, height)


def face_crop(
    img: np.ndarray,
    face: FaceBox,
    face_crop_aug_range: tuple[float, float],
    bucket: tuple[int, int],
    *,
    random_crop: bool,
    rng: random.Random,
    interpolation: str | None = None,
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Scale so the face is 1/range[1] .. 1/range[0] of the bucket's short side, and crop around it.

    As sd-scripts: the scale is drawn uniformly in that range (never above 1), the crop is centred on the
    face, shifted by up to face/20 when the range is not a single value, or (``random_crop``) by a
    triangular random offset so background gets in. Unlike sd-scripts, an image smaller than the bucket is
    enlarged to cover it instead of failing. Returns the image and ``crop_ltrb`` in resized-image pixels.
    """
    height, width = img.shape[:2]
    target_w, target_h = bucket
    if (width, height) == (target_w, target_h):
        return img, (0, 0, target_w, target_h)

    face_size = max(face.width, face.height)
    short_side = min(target_w, target_h)
    cover = max(target_h / height, target_w / width)
    low, high = face_crop_aug_range
    min_scale = max(cover, min(1.0, short_side / (face_size * high)))
    max_scale = max(min_scale, min(1.0, short_side / (face_size * low)))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)

    new_w = max(int(width * scale + 0.5), target_w)
    new_h = max(int(height * scale + 0.5), target_h)
    img = resize_image(img, (new_w, new_h), interpolation)
    face_x = int(face.cx * scale + 0.5)
    face_y = int(face.cy * scale + 0.5)

    offsets = []
    for target, length, face_pos in ((target_h, new_h, face_y), (target_w, new_w, face_x)):
        start = face_pos - target // 2
        if random_crop:
            spread = max(length - face_pos, face_pos)
            start += rng.randint(0, spread) + rng.randint(0, spread) - spread
        elif low != high and face_size > short_side // 10 and face_size >= 40:
            start += rng.randint(-face_size // 20, face_size // 20)
        offsets.append(max(0, min(start, length - target)))
    top, left = offsets
    cropped = img[top : top + target_h, left : left + target_w]
    return cropped, (left, top, left + target_w, top + target_h)


def color_aug(img: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' colour augmentation with a real gamma.

    With probability 0.33 (``rng.random() <= 0.33``), then a second draw: > 0.5 shifts the hue by
    ``rng.uniform(-8, 8)`` OpenCV hue units (+-16 degrees); otherwise applies ``rng.uniform(0.95, 1.05)``
    as a gamma on [0, 1] values (0 and 255 stay fixed). Alpha, if any, is untouched.
    """
    if rng.random() > 0.33:
        return img
    if rng.random() > 0.5:
        return _with_rgb(img, hue_shift(img[..., :3], rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)))
    return _with_rgb(img, apply_gamma(img[..., :3], rng.uniform(*GAMMA_RANGE)))


def hue_shift(rgb: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue by ``shift`` OpenCV hue units (180 per turn)."""
    hsv = np.array(Image.fromarray(np.ascontiguousarray(rgb)).convert("HSV"))
    step = int(round(shift * 256.0 / 180.0))
    hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + step) % 256).astype(np.uint8)
    return np.array(Image.fromarray(hsv, "HSV").convert("RGB"))


def apply_gamma(rgb: np.ndarray, gamma: float) -> np.ndarray:
    """``255 * (x / 255) ** gamma``, rounded."""
    table = np.round(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
    return table[rgb]


def _with_rgb(img: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    if img.shape[2] == 3:
        return rgb
    return np.dstack([rgb, img[..., 3:]])


def flip(img: np.ndarray) -> np.ndarray:
    """Mirror left-right."""
    return np.ascontiguousarray(img[:, ::-1])


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """The RGB channels as a float tensor C x H x W in [-1, 1] (alpha, if any, is left out)."""
    chw = np.ascontiguousarray(img[..., :3].transpose(2, 0, 1), dtype=np.float32)
    chw /= 127.5
    chw -= 1.0
    return torch.from_numpy(chw)


def alpha_to_mask(img: np.ndarray) -> torch.Tensor:
    """The alpha channel as a float H x W mask in [0, 1]; all ones for an image without alpha."""
    if img.ndim == 3 and img.shape[2] == 4:
        return torch.from_numpy(np.ascontiguousarray(img[..., 3])).float().div_(255.0)
    return torch.ones(img.shape[:2], dtype=torch.float32)
