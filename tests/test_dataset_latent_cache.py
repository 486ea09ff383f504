"""Latent cache: in memory and on disk, keys (content, bucket, VAE), multi-process split, batches with latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from library.dataset import build_dataset_group, make_train_loader
from library.dataset.latent_cache import npz_path
from library.errors import UserError
from tests.dataset_helpers import dataset, db_subset, group_params, make_folder


class CountingEncoder:
    """A deterministic stand-in for a VAE: 8x8 average pooling plus a luminance channel; counts images."""

    def __init__(self):
        self.images = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        pooled = F.avg_pool2d(x, 8)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)


def _build(folder, resolution=(128, 128), **sub):
    ds = dataset([db_subset(folder, class_tokens="x", **sub)], resolution=resolution, batch_size=2,
                 enable_bucket=True)
    return build_dataset_group(group_params(ds), seed=0)


def _batches(group, epoch=0):
    loader = make_train_loader(group, seed=0, num_workers=0, persistent_workers=False)
    loader.set_epoch(epoch)
    return list(loader)


def test_memory_cache_batches_carry_latents(tmp_path, image_factory):
    make_folder(image_factory, tmp_path / "a", [(64, 64), (64, 64), (192, 64)])
    group = _build(tmp_path / "a", flip_aug=True)
    enc = CountingEncoder()
    uncached = {tuple(b["image_paths"]): b for b in _batches(group)}
    group.cache_latents(enc, cache_key="test-vae", to_disk=False, batch_size=2)
    assert enc.images == 3 * 2  # both orientations
    assert not list((tmp_path / "a").glob("*.npz"))
    flips = []
    for b in _batches(group):
        assert "images" not in b
        ref = uncached[tuple(b["image_paths"])]
        n, _, h, w = ref["images"].shape
        assert b["latents"].shape == (n, 4, h // 8, w // 8)
        assert b["flipped"] == ref["flipped"] and b["captions"] == ref["captions"]
        expected = CountingEncoder()(ref["images"])  # same image pipeline, flips included
        torch.testing.assert_close(b["latents"], expected, atol=1e-5, rtol=0)
        assert torch.equal(b["crop_top_lefts"], ref["crop_top_lefts"])
        flips += b["flipped"]
    assert any(flips) or len(flips) < 3
    workers = make_train_loader(group, seed=0, num_workers=2, persistent_workers=False)
    workers.set_epoch(0)
    for a, b in zip(_batches(group), workers):
        assert a["image_paths"] == b["image_paths"] and torch.equal(a["latents"], b["latents"])


def test_disk_cache_hit_miss_and_invalidation(tmp_path, image_factory):
    folder = tmp_path / "a"
    paths = make_folder(image_factory, folder, [(64, 64), (64, 64), (192, 64)])
    group = _build(folder)
    enc = CountingEncoder()
    group.cache_latents(enc, cache_key="vae-1", to_disk=True, batch_size=2)
    assert enc.images == 3
    npz = npz_path(paths[0], (64, 64))
    assert npz.name == "img00_0064x0064_sd.npz" and npz.is_file()
    with np.load(npz) as data:
        assert {"latents", "original_size", "crop_ltrb", "cache_meta"} <= set(data.files)
        assert data["latents"].shape == (4, 16, 16) and data["latents"].dtype == np.float32
        assert data["original_size"].tolist() == [64, 64]
        assert data["crop_ltrb"].tolist() == [0, 0, 128, 128]
    assert all("latents" in b for b in _batches(group))

    def rerun():
        e = CountingEncoder()
        _build(folder).cache_latents(e, cache_key="vae-1", to_disk=True, batch_size=2)
        return e.images

    assert rerun() == 0  # everything valid: nothing encoded
    e = CountingEncoder()
    _build(folder).cache_latents(e, cache_key="vae-1", to_disk=True, batch_size=2, recompute=True)
    assert e.images == 3
    image_factory(paths[1], (64, 64), seed=99)  # same name and size, new content
    assert rerun() == 1
    assert rerun() == 0
    npz_path(paths[2], (192, 64)).write_bytes(b"broken")  # damaged file: recomputed
    assert rerun() == 1
    # another VAE, another bucket (resolution) or flip_aug: stale entries are not used
    e = CountingEncoder()
    _build(folder).cache_latents(e, cache_key="vae-2", to_disk=True, batch_size=2)
    assert e.images == 3
    e = CountingEncoder()
    _build(folder, resolution=(192, 192)).cache_latents(e, cache_key="vae-2", to_disk=True, batch_size=4)
    assert e.images == 3
    e = CountingEncoder()
    _build(folder, resolution=(192, 192), flip_aug=True).cache_latents(e, cache_key="vae-2", to_disk=True,
                                                                         batch_size=4)
    assert e.images == 6
    with np.load(npz) as data:
        assert data["latents_flipped"].shape == (4, 24, 24)


def test_touched_but_unchanged_image_is_a_hit(tmp_path, image_factory):
    folder = tmp_path / "a"
    paths = make_folder(image_factory, folder, [(64, 64)])
    _build(folder).cache_latents(CountingEncoder(), cache_key="v", to_disk=True, batch_size=1)
    paths[0].write_bytes(paths[0].read_bytes())  # new mtime, same bytes
    e = CountingEncoder()
    _build(folder).cache_latents(e, cache_key="v", to_disk=True, batch_size=1)
    assert e.images == 0


def test_two_processes_split_the_work(tmp_path, image_factory):
    folder = tmp_path / "a"
    make_folder(image_factory, folder, [(64, 64)] * 5)
    counts = []
    for rank in range(2):
        e = CountingEncoder()
        _build(folder).cache_latents(e, cache_key="v", to_disk=True, batch_size=2, process_index=rank,
                                     num_processes=2)
        counts.append(e.images)
    assert counts == [3, 2]
    assert len(list(folder.glob("*_sd.npz"))) == 5
    group = _build(folder)
    e = CountingEncoder()
    group.cache_latents(e, cache_key="v", to_disk=True, batch_size=2, process_index=1, num_processes=2)
    assert e.images == 0
    batches = _batches(group)  # process 1 reads process 0's files too
    assert sum(len(b["image_paths"]) for b in batches) == 5 and all("latents" in b for b in batches)


def test_alpha_mask_cached(tmp_path, image_factory):
    folder = tmp_path / "a"
    image_factory(folder / "m.png", (64, 64), mode="RGBA")
    group = _build(folder, alpha_mask=True)
    uncached = _batches(group)[0]
    group.cache_latents(CountingEncoder(), cache_key="v", to_disk=True, batch_size=1)
    with np.load(npz_path(folder / "m.png", (64, 64))) as data:
        assert data["alpha_mask"].shape == (128, 128)
    cached = _batches(group)[0]
    torch.testing.assert_close(cached["alpha_masks"], uncached["alpha_masks"])


def test_uncacheable_options_are_refused(tmp_path, image_factory):
    make_folder(image_factory, tmp_path / "a", [(64, 64)])
    group = _build(tmp_path / "a", random_crop=True, color_aug=True)
    reasons = group.latent_cacheable()
    assert len(reasons) == 1 and "random_crop" in reasons[0] and "color_aug" in reasons[0]
    with pytest.raises(UserError) as err:
        group.cache_latents(CountingEncoder(), cache_key="v", to_disk=False, batch_size=1)
    assert "random_crop" in err.value.message
    assert _build(tmp_path / "a", flip_aug=True).latent_cacheable() == []


def test_real_tiny_vae(tmp_path, image_factory):
    from diffusers import AutoencoderKL

    from library.models.tiny import TinyConfig

    torch.manual_seed(0)
    vae = AutoencoderKL(**TinyConfig().vae_config()).eval()
    make_folder(image_factory, tmp_path / "a", [(64, 64), (192, 64)])
    group = _build(tmp_path / "a")

    def encode(x):
        return vae.encode(x).latent_dist.mode() * vae.config.scaling_factor

    group.cache_latents(encode, cache_key="tiny-vae", to_disk=True, batch_size=2)
    shapes = sorted(tuple(b["latents"].shape) for b in _batches(group))
    assert shapes == [(1, 4, 8, 24), (1, 4, 16, 16)]


def test_same_stem_and_two_resolutions_do_not_collide(tmp_path, image_factory):
    folder = tmp_path / "a"
    image_factory(folder / "x.png", (64, 64), seed=1)
    image_factory(folder / "x.jpg", (64, 64), seed=2)
    d0 = dataset([db_subset(folder, class_tokens="t")], resolution=(128, 128))
    d1 = dataset([db_subset(folder, origin="datasets[1].subsets[0]", class_tokens="t")], origin="datasets[1]",
                 resolution=(192, 192))
    group = build_dataset_group(group_params(d0, d1), seed=0)
    enc = CountingEncoder()
    group.cache_latents(enc, cache_key="v", to_disk=True, batch_size=2)
    assert enc.images == 4 and len(list(folder.glob("*_sd.npz"))) == 4
    batches = _batches(group)
    assert sorted(tuple(b["latents"].shape[2:]) for b in batches) == [(16, 16), (16, 16), (24, 24), (24, 24)]
    e = CountingEncoder()
    build_dataset_group(group_params(d0, d1), seed=0).cache_latents(e, cache_key="v", to_disk=True, batch_size=2)
    assert e.images == 0
