"""Bucket list and image -> bucket assignment. Expected values computed by hand from the documented formula."""

from __future__ import annotations

import pytest

from library.config.params import DatasetParams
from library.dataset.buckets import BucketChoice, BucketManager, ImageTooSmallError, make_bucket_resolutions
from library.errors import UserError

BUCKETS_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def test_buckets_for_512():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == BUCKETS_512


def test_buckets_for_1024_wide_range():
    resos = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert len(resos) == 41
    for reso in [(256, 2048), (512, 1856), (512, 1920), (512, 1984), (512, 2048), (1024, 1024), (2048, 256)]:
        assert reso in resos
    assert all(w * h <= 1024 * 1024 for w, h in resos)
    assert resos == sorted(resos)


def test_buckets_for_1024_narrow_range():
    resos = make_bucket_resolutions((1024, 1024), 640, 1536, 64)
    assert resos == [
        (640, 1536), (704, 1408), (704, 1472), (768, 1280), (768, 1344), (832, 1216), (896, 1152), (960, 1088),
        (1024, 1024),
        (1088, 960), (1152, 896), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    ]


def test_non_square_resolution_uses_its_area():
    resos = make_bucket_resolutions((768, 512), 256, 1024, 64)
    assert (576, 576) in resos  # floor(sqrt(393216) / 64) * 64 = 576
    assert (1024, 384) in resos  # 393216 // 1024 = 384


@pytest.mark.parametrize(
    "size, bucket, resized, ar_error",
    [
        ((512, 512), (512, 512), (512, 512), 0.0),
        ((1024, 1024), (512, 512), (512, 512), 0.0),
        ((600, 400), (640, 384), (640, 427), 640 / 384 - 1.5),
        ((300, 1000), (256, 832), (256, 853), 256 / 832 - 0.3),
        ((2000, 500), (1024, 256), (1024, 256), 0.0),
        ((100, 80), (576, 448), (576, 461), 576 / 448 - 1.25),  # small images are enlarged
        ((640, 384), (640, 384), (640, 384), 0.0),  # exactly a bucket
        ((400, 600), (384, 640), (427, 640), 384 / 640 - 400 / 600),
    ],
)
def test_select_bucket_upscale(size, bucket, resized, ar_error):
    manager = BucketManager(False, (512, 512), 256, 1024, 64)
    choice = manager.select_bucket(*size)
    assert choice == BucketChoice(bucket=bucket, resized=resized, ar_error=pytest.approx(ar_error))


@pytest.mark.parametrize(
    "size, bucket, resized",
    [
        ((300, 200), (256, 192), (300, 200)),  # small enough: kept, bucket floors to steps
        ((700, 300), (640, 256), (700, 300)),
        ((1024, 768), (512, 384), (512, 384)),  # height rounding wins (exact 4:3)
        ((2000, 1000), (640, 320), (640, 320)),
        ((1000, 2000), (320, 640), (320, 640)),  # width rounding wins
    ],
)
def test_select_bucket_no_upscale(size, bucket, resized):
    manager = BucketManager(True, (512, 512), 256, 1024, 64)
    choice = manager.select_bucket(*size)
    assert choice.bucket == bucket
    assert choice.resized == resized
    assert choice.ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])


def test_no_upscale_ignores_min_max_bucket_reso():
    manager = BucketManager(True, (512, 512), 512, 512, 64)
    assert manager.select_bucket(300, 1000).bucket == (256, 832)


def test_no_upscale_rejects_images_smaller_than_a_step():
    manager = BucketManager(True, (512, 512), 256, 1024, 64)
    with pytest.raises(ImageTooSmallError, match="50x500"):
        manager.select_bucket(50, 500)


@pytest.mark.parametrize(
    "resolution, size, resized",
    [
        ((512, 512), (1024, 768), (683, 512)),
        ((512, 512), (256, 256), (512, 512)),
        ((512, 512), (512, 512), (512, 512)),
        ((512, 768), (512, 512), (768, 768)),
        ((512, 768), (300, 1000), (512, 1707)),
    ],
)
def test_without_bucketing_one_bucket_covered(resolution, size, resized):
    manager = BucketManager(False, resolution, 256, 1024, 64, enable_bucket=False)
    choice = manager.select_bucket(*size)
    assert choice.bucket == resolution
    assert choice.resized == resized


def test_from_params():
    params = DatasetParams(origin="datasets[0]", kind="dreambooth", subsets=[], resolution=(512, 512),
                           enable_bucket=True)
    manager = BucketManager.from_params(params)
    assert manager.resos == BUCKETS_512
    assert manager.select_bucket(600, 400).bucket == (640, 384)


def test_min_max_not_multiple_of_steps_are_adjusted():
    manager = BucketManager(False, (512, 512), 300, 1000, 64)
    assert (manager.min_size, manager.max_size) == (256, 1024)
    assert manager.resos == BUCKETS_512


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_reso=(512, 512), min_size=256, max_size=1024, reso_steps=32), "bucket_reso_steps = 32"),
        (dict(max_reso=(2048, 512), min_size=256, max_size=1024, reso_steps=64), "outside the bucket range"),
        (dict(max_reso=(512, 512), min_size=640, max_size=1024, reso_steps=64), "outside the bucket range"),
        (dict(max_reso=(512, 512), min_size=1024, max_size=512, reso_steps=64), "larger than max_bucket_reso"),
        (dict(max_reso=(512, 512), min_size=256, max_size=1024, reso_steps=0), "bucket_reso_steps = 0"),
    ],
)
def test_impossible_settings(kwargs, message):
    with pytest.raises(UserError, match=message) as info:
        BucketManager(False, **kwargs, origin="datasets[2]")
    assert "datasets[2]" in info.value.message


def test_required_step_is_configurable():
    manager = BucketManager(False, (1024, 1024), 256, 2048, 32, required_step=32)
    assert (1024, 1024) in manager.resos
    with pytest.raises(UserError, match="multiple of 64"):
        BucketManager(False, (1024, 1024), 256, 2048, 32, required_step=64)


def test_resolution_must_fit_model_without_bucketing():
    with pytest.raises(UserError, match="496x512"):
        BucketManager(False, (500, 512), 256, 1024, 64, enable_bucket=False)
    assert BucketManager(False, (520, 512), 256, 1024, 64, enable_bucket=False).resos == [(520, 512)]
