"""Aspect-ratio bucketing: which training resolution (bucket) each image gets, and how it is resized.

The bucket list and the image -> bucket assignment follow sd-scripts exactly, so the same images land in
the same buckets with the same resized sizes. Three modes:

- upscale (default with ``enable_bucket``): a fixed list of buckets of about the resolution's area
  (:func:`make_bucket_resolutions`); each image goes to the bucket with the nearest aspect ratio and is
  scaled (up or down) to cover it, the overhang is cropped.
- ``bucket_no_upscale``: images larger than the resolution's area are shrunk to that area; the bucket is
  the (resized) image size rounded down to ``reso_steps``; images are never enlarged.
- no bucketing (``enable_bucket`` false): one bucket, the resolution; every image is scaled to cover it
  and cropped (sd-scripts instead asserts unless the image is already large enough and ``random_crop``
  is on).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from library.config.params import DatasetParams
from library.errors import UserError

logger = logging.getLogger(__name__)

LATENT_FACTOR = 8  # pixels per latent pixel: any training size must be a multiple of it


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes.

    ``bucket``: (width, height) of the training tensor. ``resized``: (width, height) the image is resized
    to before cropping to ``bucket`` (always >= bucket on both axes). ``ar_error``: bucket aspect ratio
    minus image aspect ratio (signed, as sd-scripts reports it; its mean absolute value measures distortion).
    """

    bucket: tuple[int, int]
    resized: tuple[int, int]
    ar_error: float


class ImageTooSmallError(UserError):
    """An image too small to give a non-empty bucket (``bucket_no_upscale`` never enlarges)."""


def make_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[tuple[int, int]]:
    """The predefined buckets of upscale mode (sd-scripts' formula), sorted.

    With ``A = max_w * max_h``: the square ``s = floor(sqrt(A) / divisible) * divisible`` plus, for every
    width ``w`` from ``min_size`` to ``max_size`` in steps of ``divisible``, the bucket
    ``h = min(max_size, floor((A // w) / divisible) * divisible)`` and its transpose when ``h >= min_size``.
    """
    max_width, max_height = max_reso
    max_area = max_width * max_height

    resos: set[tuple[int, int]] = set()
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((side, side))

    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


class BucketManager:
    """Assigns images to buckets for one dataset.

    ``max_reso`` is the dataset resolution (width, height). ``min_size``/``max_size``/``reso_steps`` are
    ``min_bucket_reso``/``max_bucket_reso``/``bucket_reso_steps``. ``enable_bucket=False`` gives the single
    bucket ``max_reso``. ``required_step`` is what the model needs (64 for SD1/2): ``reso_steps`` must be a
    multiple of it; without bucketing the resolution must be a multiple of :data:`LATENT_FACTOR`.
    Impossible settings raise :class:`UserError`.
    """

    def __init__(
        self,
        no_upscale: bool,
        max_reso: tuple[int, int],
        min_size: int,
        max_size: int,
        reso_steps: int,
        *,
        enable_bucket: bool = True,
        required_step: int = 64,
        origin: str = "dataset",
    ):
        self.no_upscale = no_upscale
        self.enable_bucket = enable_bucket
        self.max_reso = (int(max_reso[0]), int(max_reso[1]))
        self.max_area = self.max_reso[0] * self.max_reso[1]
        self.reso_steps = reso_steps
        self.origin = origin
        self.min_size, self.max_size = self._validate(min_size, max_size, required_step)

        self.resos: list[tuple[int, int]] = []
        self._aspect_ratios: list[float] = []
        if enable_bucket and not no_upscale:
            self.resos = make_bucket_resolutions(self.max_reso, self.min_size, self.max_size, reso_steps)
        elif not enable_bucket:
            self.resos = [self.max_reso]
        self._reso_set = set(self.resos)
        self._aspect_ratios = [w / h for w, h in self.resos]

    @classmethod
    def from_params(cls, params: DatasetParams, required_step: int = 64) -> "BucketManager":
        """Build from a :class:`library.config.params.DatasetParams`."""
        return cls(
            params.bucket_no_upscale,
            tuple(params.resolution),
            params.min_bucket_reso,
            params.max_bucket_reso,
            params.bucket_reso_steps,
            enable_bucket=params.enable_bucket,
            required_step=required_step,
            origin=params.origin,
        )

    def _validate(self, min_size: int, max_size: int, required_step: int) -> tuple[int, int]:
        width, height = self.max_reso
        where = self.origin
        if width <= 0 or height <= 0:
            raise UserError(f"{where}: resolution {width}x{height} must be positive (e.g. resolution = 512)")
        if not self.enable_bucket:
            if width % LATENT_FACTOR or height % LATENT_FACTOR:
                raise UserError(
                    f"{where}: resolution {width}x{height} must be a multiple of {LATENT_FACTOR} (the VAE's "
                    f"downscaling); use e.g. {_nearest_multiple(width, LATENT_FACTOR)}x"
                    f"{_nearest_multiple(height, LATENT_FACTOR)} ({required_step}x{required_step} steps are best), "
                    "or set enable_bucket = true"
                )
            return min_size, max_size
        steps = self.reso_steps
        if steps <= 0 or steps % required_step:
            raise UserError(
                f"{where}: bucket_reso_steps = {steps} must be a positive multiple of {required_step} "
                f"for this model (e.g. bucket_reso_steps = {required_step})"
            )
        if self.no_upscale:
            return min_size, max_size  # min/max bucket reso do not apply: buckets follow the image sizes
        if min_size <= 0 or max_size <= 0:
            raise UserError(
                f"{where}: min_bucket_reso ({min_size}) and max_bucket_reso ({max_size}) must be positive"
            )
        adj_min = _round_down(min_size, steps)
        adj_max = -(-max_size // steps) * steps
        if (adj_min, adj_max) != (min_size, max_size):
            logger.warning(
                "%s: min_bucket_reso/max_bucket_reso %d/%d are not multiples of bucket_reso_steps %d; using %d/%d",
                where, min_size, max_size, steps, adj_min, adj_max,
            )
        if adj_min <= 0:
            raise UserError(f"{where}: min_bucket_reso ({min_size}) must be at least bucket_reso_steps ({steps})")
        if adj_min > adj_max:
            raise UserError(
                f"{where}: min_bucket_reso ({min_size}) is larger than max_bucket_reso ({max_size}); swap them"
            )
        fixes = []
        if min(width, height) < adj_min:
            fixes.append(f"lower min_bucket_reso ({adj_min}) to at most {min(width, height)}")
        if max(width, height) > adj_max:
            fixes.append(f"raise max_bucket_reso ({adj_max}) to at least {max(width, height)}")
        if fixes:
            raise UserError(
                f"{where}: resolution {width}x{height} is outside the bucket range "
                f"min_bucket_reso = {adj_min} .. max_bucket_reso = {adj_max}; {' and '.join(fixes)}, or change the "
                "resolution"
            )
        return adj_min, adj_max

    def select_bucket(self, width: int, height: int) -> BucketChoice:
        """The bucket and resized size of an image of ``width`` x ``height`` pixels."""
        if width <= 0 or height <= 0:
            raise ImageTooSmallError(f"image size {width}x{height} is empty")
        aspect = width / height
        if self.no_upscale and self.enable_bucket:
            resized = self._no_upscale_size(width, height, aspect)
            bucket = (_round_down(resized[0], self.reso_steps), _round_down(resized[1], self.reso_steps))
            if bucket[0] == 0 or bucket[1] == 0:
                raise ImageTooSmallError(
                    f"image size {width}x{height} is smaller than bucket_reso_steps ({self.reso_steps}) on one side; "
                    "bucket_no_upscale never enlarges images: remove the image or turn off bucket_no_upscale"
                )
        else:
            bucket = self._nearest_bucket(width, height, aspect)
            if aspect > bucket[0] / bucket[1]:  # image wider than the bucket: match heights
                scale = bucket[1] / height
            else:
                scale = bucket[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
            resized = (max(resized[0], bucket[0]), max(resized[1], bucket[1]))
        return BucketChoice(bucket=bucket, resized=resized, ar_error=bucket[0] / bucket[1] - aspect)

    def _nearest_bucket(self, width: int, height: int, aspect: float) -> tuple[int, int]:
        if (width, height) in self._reso_set:
            return (width, height)
        errors = [abs(ar - aspect) for ar in self._aspect_ratios]
        return self.resos[errors.index(min(errors))]  # first wins on ties, like numpy.argmin

    def _no_upscale_size(self, width: int, height: int, aspect: float) -> tuple[int, int]:
        if width * height <= self.max_area:
            return (width, height)
        resized_width = math.sqrt(self.max_area * aspect)
        resized_height = self.max_area / resized_width

        # Round either side to steps; keep the variant whose aspect ratio is closer to the image's.
        width_rounded = self._round_to_steps(resized_width)
        height_for_width = self._round_to_steps(width_rounded / aspect)
        height_rounded = self._round_to_steps(resized_height)
        width_for_height = self._round_to_steps(height_rounded * aspect)
        error_w = abs(width_rounded / height_for_width - aspect) if height_for_width else math.inf
        error_h = abs(width_for_height / height_rounded - aspect) if height_rounded else math.inf
        if error_w < error_h:
            return (width_rounded, int(width_rounded / aspect + 0.5))
        return (int(height_rounded * aspect + 0.5), height_rounded)

    def _round_to_steps(self, value: float) -> int:
        rounded = int(value + 0.5)
        return rounded - rounded % self.reso_steps


def _nearest_multiple(value: int, step: int) -> int:
    """The multiple of ``step`` closest to ``value``, at least ``step`` (a size to suggest)."""
    return max(step, int(round(value / step)) * step)


def _round_down(value: int, step: int) -> int:
    return value - value % step
