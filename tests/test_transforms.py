"""Image loading and transforms on generated images."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from library.dataset.buckets import BucketChoice, BucketManager
from library.dataset.transforms import (
    FaceBox,
    ImageReadError,
    alpha_to_mask,
    color_aug,
    face_crop,
    fit_to_bucket,
    flip,
    load_image,
    parse_face_box,
    read_image_size,
    resize_image,
    to_tensor,
)
from library.errors import UserError


def noise(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def test_load_rgb_and_alpha(tmp_path, image_factory):
    path = image_factory(tmp_path / "a.png", (40, 30))
    img = load_image(path)
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8
    assert np.array_equal(img, np.array(Image.open(path)))
    with_alpha = load_image(path, with_alpha=True)
    assert with_alpha.shape == (30, 40, 4)
    assert (with_alpha[..., 3] == 255).all()

    rgba_path = image_factory(tmp_path / "b.png", (20, 10), mode="RGBA")
    rgba = load_image(rgba_path, with_alpha=True)
    assert np.array_equal(rgba, np.array(Image.open(rgba_path)))
    assert load_image(rgba_path).shape == (10, 20, 3)


def test_load_grayscale_and_16_bit(tmp_path):
    Image.fromarray(np.full((4, 6), 77, np.uint8), "L").save(tmp_path / "gray.png")
    gray = load_image(tmp_path / "gray.png")
    assert gray.shape == (4, 6, 3) and (gray == 77).all()

    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    deep = load_image(tmp_path / "deep.png")
    assert deep[0, :, 0].tolist() == [0, 100, 255]


def test_exif_orientation_applied(tmp_path):
    original = noise(20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display needs a 90 degree clockwise turn
    path = tmp_path / "rotated.png"
    Image.fromarray(original).save(path, exif=exif)
    loaded = load_image(path)
    assert loaded.shape == (40, 20, 3)
    assert np.array_equal(loaded, np.rot90(original, k=-1))
    assert read_image_size(path) == (20, 40)


@pytest.mark.parametrize(
    "orientation, expected",
    [
        (1, lambda a: a),
        (2, lambda a: a[:, ::-1]),
        (3, lambda a: a[::-1, ::-1]),
        (4, lambda a: a[::-1]),
        (5, lambda a: a.transpose(1, 0, 2)),
        (6, lambda a: np.rot90(a, k=-1)),
        (7, lambda a: np.rot90(a, k=2).transpose(1, 0, 2)),
        (8, lambda a: np.rot90(a, k=1)),
    ],
)
def test_every_exif_orientation_matches_pillow(tmp_path, orientation, expected):
    original = noise(6, 10, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    Image.fromarray(original).save(path, exif=exif)
    loaded = load_image(path)
    assert np.array_equal(loaded, expected(original))
    assert np.array_equal(loaded, np.array(ImageOps.exif_transpose(Image.open(path))))
    assert read_image_size(path) == (loaded.shape[1], loaded.shape[0])


def test_corrupt_and_missing_files(tmp_path, image_factory):
    bad = tmp_path / "not_really.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ImageReadError, match="not_really.png") as info:
        load_image(bad)
    assert isinstance(info.value, UserError) and info.value.path == str(bad)

    good = image_factory(tmp_path / "good.png", (64, 64))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ImageReadError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(ImageReadError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageReadError, match="not_really.png"):
        read_image_size(bad)


def test_downscale_is_area_average():
    base = np.random.default_rng(1).integers(0, 250, (8, 12, 3)).astype(np.uint8)
    img = np.zeros((16, 24, 3), np.uint8)
    img[0::2, 0::2] = base
    img[0::2, 1::2] = base + 1
    img[1::2, 0::2] = base + 2
    img[1::2, 1::2] = base + 1  # every 2x2 block averages to exactly base + 1
    small = resize_image(img, (12, 8))
    assert np.array_equal(small, base + 1)

    random_img = noise(32, 32, seed=3)
    block_mean = random_img.reshape(16, 2, 16, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(resize_image(random_img, (16, 16)).astype(np.float64) - block_mean).max() <= 1.0


def pil_resize(img: np.ndarray, size, resample) -> np.ndarray:
    return np.array(Image.fromarray(img).resize(size, resample))


def test_interpolation_choice():
    img = noise(30, 40)
    R = Image.Resampling
    assert np.array_equal(resize_image(img, (30, 20)), pil_resize(img, (30, 20), R.BOX))
    assert np.array_equal(resize_image(img, (80, 60)), pil_resize(img, (80, 60), R.LANCZOS))
    assert np.array_equal(resize_image(img, (30, 60)), pil_resize(img, (30, 60), R.LANCZOS))  # one side grows
    assert np.array_equal(resize_image(img, (30, 20), "cubic"), pil_resize(img, (30, 20), R.BICUBIC))
    assert np.array_equal(resize_image(img, (80, 60), "area"), pil_resize(img, (80, 60), R.BOX))
    assert np.array_equal(resize_image(img, (80, 60), "nearest"), pil_resize(img, (80, 60), R.NEAREST))
    assert np.array_equal(resize_image(img, (80, 60), "linear"), pil_resize(img, (80, 60), R.BILINEAR))
    assert resize_image(img, (40, 30)) is img
    with pytest.raises(UserError, match="unknown resize_interpolation 'spline'"):
        resize_image(img, (20, 15), "spline")


def test_resize_keeps_colour_under_transparency():
    img = np.zeros((20, 20, 4), np.uint8)
    img[..., :3] = 200
    img[:, 10:, 3] = 255
    out = resize_image(img, (10, 10))
    assert out.shape == (10, 10, 4)
    assert (out[..., :3] == 200).all()
    assert (out[:, :5, 3] == 0).all() and (out[:, 5:, 3] == 255).all()


def test_fit_to_bucket_center_crop():
    img = noise(400, 600)
    choice = BucketManager(False, (512, 512), 256, 1024, 64).select_bucket(600, 400)
    assert (choice.bucket, choice.resized) == ((640, 384), (640, 427))
    out, ltrb = fit_to_bucket(img, choice, random_crop=False)
    assert out.shape == (384, 640, 3)
    assert ltrb == (0, 21, 640, 405)  # (427 - 384) // 2 = 21
    assert np.array_equal(out, resize_image(img, (640, 427))[21:405])


def test_fit_to_bucket_random_crop():
    img = noise(80, 100)
    choice = BucketChoice(bucket=(64, 64), resized=(100, 80), ar_error=0.0)
    offsets = set()
    for seed in range(8):
        replay = random.Random(seed)
        left, top = replay.randint(0, 36), replay.randint(0, 16)
        out, ltrb = fit_to_bucket(img, choice, random_crop=True, rng=random.Random(seed))
        assert ltrb == (left, top, left + 64, top + 64)
        assert np.array_equal(out, img[top : top + 64, left : left + 64])
        offsets.add(ltrb)
    assert len(offsets) > 1


def test_fit_without_bucketing_covers_resolution():
    manager = BucketManager(False, (64, 64), 64, 64, 64, enable_bucket=False)
    out, ltrb = fit_to_bucket(noise(100, 50), manager.select_bucket(50, 100), random_crop=False)
    assert out.shape == (64, 64, 3)
    assert ltrb == (0, 32, 64, 96)  # resized to 64x128, centre crop


def test_flip():
    img = noise(5, 7)
    flipped = flip(img)
    assert np.array_equal(flipped[:, 0], img[:, -1])
    assert np.array_equal(flipped[:, 6], img[:, 0])
    assert np.array_equal(flip(flipped), img)


def test_to_tensor_range_and_layout():
    img = np.zeros((2, 3, 4), np.uint8)
    img[0, 0] = [255, 0, 0, 17]
    img[1, 2] = [0, 255, 128, 0]
    tensor = to_tensor(img)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert tensor[:, 0, 0].tolist() == [1.0, -1.0, -1.0]
    assert tensor[:, 1, 2].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    assert tensor.min() >= -1 and tensor.max() <= 1


def test_alpha_to_mask():
    img = np.zeros((2, 2, 4), np.uint8)
    img[..., 3] = [[0, 128], [255, 51]]
    mask = alpha_to_mask(img)
    assert mask.shape == (2, 2) and mask.dtype == torch.float32
    assert mask.flatten().tolist() == pytest.approx([0.0, 128 / 255, 1.0, 0.2], abs=1e-6)
    assert torch.equal(alpha_to_mask(noise(3, 4)), torch.ones(3, 4))


def _seed_for(branch: str) -> int:
    for seed in range(1000):
        r = random.Random(seed)
        if r.random() > 0.33:
            taken = "none"
        else:
            taken = "hue" if r.random() > 0.5 else "gamma"
        if taken == branch:
            return seed
    raise AssertionError(branch)


def test_color_aug_gamma_is_a_real_gamma():
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (2, 1, 3))
    seed = _seed_for("gamma")
    replay = random.Random(seed)
    replay.random(), replay.random()
    gamma = replay.uniform(0.95, 1.05)
    out = color_aug(ramp, random.Random(seed))
    expected = np.round(255 * (np.arange(256) / 255) ** gamma)
    assert out[0, :, 0].tolist() == expected.tolist()
    assert out[0, 0, 0] == 0 and out[0, 255, 0] == 255  # end points fixed
    assert np.abs(out.astype(int) - ramp.astype(int)).max() <= 255 * 0.05


def test_color_aug_hue_shift():
    img = np.zeros((2, 2, 4), np.uint8)
    img[0, 0, :3] = [200, 40, 40]  # saturated red
    img[0, 1, :3] = [90, 90, 90]  # gray: no hue
    img[..., 3] = 99
    seed = _seed_for("hue")
    replay = random.Random(seed)
    replay.random(), replay.random()
    shift = replay.uniform(-8, 8)
    out = color_aug(img, random.Random(seed))
    assert out[0, 1, :3].tolist() == [90, 90, 90]
    assert (out[..., 3] == 99).all()
    hue_before = np.array(Image.fromarray(img[..., :3]).convert("HSV"))[0, 0, 0]
    hue_after = np.array(Image.fromarray(out[..., :3]).convert("HSV"))[0, 0, 0]
    moved = (int(hue_after) - int(hue_before) + 128) % 256 - 128
    assert moved == pytest.approx(shift * 256 / 180, abs=2)
    assert moved != 0


def test_color_aug_mostly_leaves_images_alone():
    img = noise(4, 4)
    out = color_aug(img, random.Random(_seed_for("none")))
    assert np.array_equal(out, img)


def test_parse_face_box():
    assert parse_face_box("/data/img_600_300_100_120.png") == FaceBox(600, 300, 100, 120)
    assert parse_face_box("my_photo_001.png") is None
    assert parse_face_box("a_b_c_d_e.jpg") is None
    assert parse_face_box("x_0_5_5_5.png") is None


def test_face_crop_centres_on_face():
    img = noise(768, 1024)
    face = FaceBox(600, 300, 100, 100)
    out, ltrb = face_crop(img, face, (2.0, 2.0), (512, 512), random_crop=False, rng=random.Random(0))
    assert ltrb == (344, 44, 856, 556)  # no scaling needed; face centre minus half the bucket
    assert np.array_equal(out, img[44:556, 344:856])


def test_face_crop_scales_big_faces_down():
    img = noise(768, 1024)
    face = FaceBox(512, 384, 800, 600)
    out, ltrb = face_crop(img, face, (1.0, 1.0), (512, 512), random_crop=False, rng=random.Random(0))
    # scale = max(cover 2/3, 512/800) = 2/3 -> 683x512; face at (341, 256)
    assert out.shape == (512, 512, 3)
    assert ltrb == (85, 0, 597, 512)
    assert np.array_equal(out, resize_image(img, (683, 512))[0:512, 85:597])


def test_face_crop_random_scale_and_jitter():
    img = noise(1024, 1024)
    face = FaceBox(500, 520, 400, 400)
    for seed in range(5):
        replay = random.Random(seed)
        scale = replay.uniform(0.5, 1.0)  # 512 / (400 * 2.56) .. min(1, 512 / 400)
        size = int(1024 * scale + 0.5)
        top = int(520 * scale + 0.5) - 256 + replay.randint(-20, 20)
        left = int(500 * scale + 0.5) - 256 + replay.randint(-20, 20)
        top, left = max(0, min(top, size - 512)), max(0, min(left, size - 512))
        out, ltrb = face_crop(img, face, (1.0, 2.56), (512, 512), random_crop=False, rng=random.Random(seed))
        assert ltrb == (left, top, left + 512, top + 512)
        assert out.shape == (512, 512, 3)


def test_face_crop_enlarges_small_images():
    out, ltrb = face_crop(noise(32, 32), FaceBox(16, 16, 8, 8), (1.0, 2.0), (64, 64),
                          random_crop=True, rng=random.Random(0))
    assert out.shape == (64, 64, 3) and ltrb == (0, 0, 64, 64)
