"""Training loader: batch contents, determinism across workers and resume, sharding, steps, debug output."""

from __future__ import annotations

import pytest
import torch

from library.dataset import build_dataset_group, debug_dataset, make_train_loader
from tests.dataset_helpers import dataset, db_subset, group_params, make_folder

AUGMENTED = dict(flip_aug=True, random_crop=True, color_aug=True, shuffle_caption=True, caption_tag_dropout_rate=0.2)


@pytest.fixture
def group(tmp_path, image_factory):
    sizes = [(80, 72)] * 5 + [(200, 64)] * 3
    caps = [f"sks, tag{i}, red, blue, green" for i in range(8)]
    make_folder(image_factory, tmp_path / "a", sizes, captions=caps)
    make_folder(image_factory, tmp_path / "r", [(64, 64)] * 3, prefix="reg")
    train = db_subset(tmp_path / "a", class_tokens="x", num_repeats=2, **AUGMENTED)
    reg = db_subset(tmp_path / "r", origin="datasets[0].subsets[1]", class_tokens="dog", is_reg=True)
    ds = dataset([train, reg], enable_bucket=True, batch_size=3, prior_loss_weight=0.25, network_multiplier=0.7)
    return build_dataset_group(group_params(ds), seed=3)


def _epoch(loader, epoch, skip=0):
    loader.set_epoch(epoch, skip_batches=skip)
    return list(loader)


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["image_paths"] == y["image_paths"]
        assert x["captions"] == y["captions"]
        assert x["flipped"] == y["flipped"]
        assert torch.equal(x["images"], y["images"])
        assert torch.equal(x["crop_top_lefts"], y["crop_top_lefts"])
        assert x["step"] == y["step"]


def test_batch_contents(group):
    loader = make_train_loader(group, seed=11, num_workers=0, persistent_workers=False)
    batches = _epoch(loader, 0)
    assert len(batches) == len(loader) == group.batches_per_epoch()
    d = group.train[0]
    total = 0
    for b in batches:
        n = len(b["image_paths"])
        total += n
        h, w = b["images"].shape[2:]
        assert b["images"].shape == (n, 3, h, w) and b["images"].dtype == torch.float32
        assert b["images"].min() >= -1.0 and b["images"].max() <= 1.0
        assert (b["target_sizes_hw"] == torch.tensor([h, w])).all()
        assert b["network_multipliers"].tolist() == pytest.approx([0.7] * n)
        is_reg = ["reg" in p.rsplit("/", 1)[1] for p in b["image_paths"]]
        assert b["loss_weights"].tolist() == [0.25 if r else 1.0 for r in is_reg]
        assert b["alpha_masks"] is None
        assert b["original_sizes_hw"].shape == (n, 2) and b["crop_top_lefts"].shape == (n, 2)
        assert len(b["captions"]) == len(b["flipped"]) == n
        for cap, reg in zip(b["captions"], is_reg):
            if reg:
                assert cap == "dog"
            else:
                assert "sks" in cap and "," in cap
        assert b["epoch"] == 0
    assert total == d.num_samples()
    # shuffle_caption actually shuffles and flips happen, with the epoch's seed
    caps = [c for b in batches for c in b["captions"] if c != "dog"]
    assert any(not c.startswith("sks") for c in caps)
    assert any(f for b in batches for f in b["flipped"]) and not all(f for b in batches for f in b["flipped"])


def test_same_data_with_and_without_workers(group):
    single = make_train_loader(group, seed=5, num_workers=0, persistent_workers=False)
    multi = make_train_loader(group, seed=5, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        _same(_epoch(single, epoch), _epoch(multi, epoch))
    other_seed = make_train_loader(group, seed=6, num_workers=0, persistent_workers=False)
    assert [b["captions"] for b in _epoch(other_seed, 0)] != [b["captions"] for b in _epoch(single, 0)]


def test_resume_with_skip_batches(group):
    loader = make_train_loader(group, seed=5, num_workers=0, persistent_workers=False, grad_accum=2)
    full = _epoch(loader, 2)
    resumed = make_train_loader(group, seed=5, num_workers=0, persistent_workers=False, grad_accum=2)
    _same(_epoch(resumed, 2, skip=3), full[3:])
    # epochs differ, the same epoch is reproducible
    assert [b["image_paths"] for b in _epoch(loader, 3)] != [b["image_paths"] for b in full]


def test_steps_follow_grad_accum(group):
    loader = make_train_loader(group, seed=5, num_workers=0, persistent_workers=False, grad_accum=2)
    per_epoch = loader.steps_per_epoch()
    assert per_epoch == -(-len(loader) // 2)
    steps = [b["step"] for b in _epoch(loader, 1)]
    assert steps == [per_epoch + k // 2 for k in range(len(loader))]
    assert all(b["epoch"] == 1 for b in _epoch(loader, 1))


def test_two_processes_share_all_batches(group):
    total = group.total_batches()
    assert total % 2 == 1  # odd, so one process gets a padding batch
    loaders = [make_train_loader(group, seed=9, num_workers=0, persistent_workers=False, process_index=i,
                                 num_processes=2) for i in range(2)]
    refs = [ld.epoch_refs(4) for ld in loaders]
    assert len(refs[0]) == len(refs[1]) == len(loaders[0]) == (total + 1) // 2
    everything = group.epoch_batches(9, 4)
    union = {r.index for rs in refs for r in rs}
    assert union == {r.index for r in everything}
    assert not {r.index for r in refs[0][: total // 2]} & {r.index for r in refs[1][: total // 2]}
    # process 1's batches are exactly those a single process would load at odd positions
    single = make_train_loader(group, seed=9, num_workers=0, persistent_workers=False)
    single_batches = _epoch(single, 4)
    p1 = _epoch(loaders[1], 4)
    for k, b in enumerate(p1[: total // 2]):
        assert b["captions"] == single_batches[2 * k + 1]["captions"]
        assert torch.equal(b["images"], single_batches[2 * k + 1]["images"])


def test_validation_loader_is_fixed(tmp_path, image_factory):
    make_folder(image_factory, tmp_path / "a", [(64, 64)] * 10, captions=[f"a, b, c{i}" for i in range(10)])
    ds = dataset([db_subset(tmp_path / "a", shuffle_caption=True, flip_aug=True)], validation_split=0.5,
                 batch_size=2)
    group = build_dataset_group(group_params(ds), seed=1)
    val = make_train_loader(group, seed=1, num_workers=0, persistent_workers=False, validation=True)
    assert len(val) == 3
    first = _epoch(val, 0)
    _same(first, _epoch(val, 7))
    val_paths = {p for b in first for p in b["image_paths"]}
    train = make_train_loader(group, seed=1, num_workers=0, persistent_workers=False)
    train_paths = {p for b in _epoch(train, 0) for p in b["image_paths"]}
    assert len(val_paths) == 5 and not val_paths & train_paths


def test_alpha_masks_and_several_datasets(tmp_path, image_factory):
    make_folder(image_factory, tmp_path / "rgba", [(64, 64)] * 2, ext=".png", captions=["m", "m"])
    for p in (tmp_path / "rgba").glob("*.png"):
        image_factory(p, (64, 64), mode="RGBA")
    make_folder(image_factory, tmp_path / "b", [(64, 64)] * 2, captions=["other", "other"])
    d0 = dataset([db_subset(tmp_path / "rgba", alpha_mask=True)], batch_size=2)
    d1 = dataset([db_subset(tmp_path / "b", origin="datasets[1].subsets[0]")], origin="datasets[1]", batch_size=2,
                 network_multiplier=0.3)
    group = build_dataset_group(group_params(d0, d1), seed=0)
    batches = _epoch(make_train_loader(group, seed=0, num_workers=0, persistent_workers=False), 0)
    assert len(batches) == 2
    for b in batches:
        if b["captions"][0] == "m":
            assert b["alpha_masks"].shape == (2, 128, 128)
            assert 0.0 <= b["alpha_masks"].min() < 1.0
            assert b["network_multipliers"].tolist() == [1.0, 1.0]
        else:
            assert b["alpha_masks"] is None
            assert b["network_multipliers"].tolist() == pytest.approx([0.3, 0.3])


def test_debug_dataset_prints_buckets_paths_captions(group):
    lines: list[str] = []
    loader = make_train_loader(group, seed=1, num_workers=0, persistent_workers=False)
    shown = debug_dataset(group, loader, max_batches=2, write=lines.append)
    text = "\n".join(lines)
    assert shown == 2
    assert "Batches per epoch" in text
    assert text.count("batch ") >= 2 and "bucket " in text
    assert "caption: " in text and "img0" in text or "reg0" in text


def test_token_warmup_uses_global_step(tmp_path, image_factory):
    make_folder(image_factory, tmp_path / "a", [(64, 64)] * 4, captions=["a, b, c, d, e, f, g, h, i"] * 4)
    ds = dataset([db_subset(tmp_path / "a", token_warmup_step=0.5, token_warmup_min=1)], batch_size=1)
    group = build_dataset_group(group_params(ds), seed=0)
    with pytest.raises(ValueError):
        make_train_loader(group, seed=0, num_workers=0, persistent_workers=False)
    group.set_max_train_steps(16)  # warmup over 8 steps: tags grow from 1 to 9
    loader = make_train_loader(group, seed=0, num_workers=0, persistent_workers=False)
    tags = {b["step"]: len(b["captions"][0].split(", ")) for e in (0, 1, 2) for b in _epoch(loader, e)}
    assert tags[0] == 1 and tags[4] == 5 and tags[8] == 9 and tags[11] == 9
    assert [tags[s] for s in range(12)] == sorted(tags[s] for s in range(12))


def test_crop_conditioning_center_and_flipped(tmp_path, image_factory):
    make_folder(image_factory, tmp_path / "a", [(128, 64)] * 6)  # resized 256x128 -> cropped to 128x128
    ds = dataset([db_subset(tmp_path / "a", class_tokens="x", flip_aug=True)], batch_size=6)
    group = build_dataset_group(group_params(ds), seed=0)
    (batch,) = _epoch(make_train_loader(group, seed=0, num_workers=0, persistent_workers=False), 0)
    assert batch["original_sizes_hw"].tolist() == [[64, 128]] * 6
    assert batch["target_sizes_hw"].tolist() == [[128, 128]] * 6
    # centre crop of a 256-wide image: left 64, right 192; mirrored: 256 - 192 = 64 as well
    assert batch["crop_top_lefts"].tolist() == [[0, 64]] * 6
    from library.dataset.samples import _crop_top_left

    assert _crop_top_left((10, 5, 138, 133), 256, flipped=False) == (5, 10)
    assert _crop_top_left((10, 5, 138, 133), 256, flipped=True) == (5, 118)


def test_image_damaged_after_scan_is_replaced_within_its_bucket(tmp_path, image_factory, caplog):
    # the header reads fine at scan time but the pixel data is cut off: the run goes on with another image
    make_folder(image_factory, tmp_path / "a", [(64, 64)] * 3, captions=["c0", "c1", "c2"])
    broken = tmp_path / "a" / "img01.png"
    broken.write_bytes(broken.read_bytes()[:200])
    sub = db_subset(tmp_path / "a", class_tokens="x", num_repeats=1)
    group = build_dataset_group(group_params(dataset([sub], batch_size=3)), seed=0)
    assert group.train[0].num_samples() == 3
    loader = make_train_loader(group, seed=0, num_workers=0, persistent_workers=False)
    loader.set_epoch(0)
    batch = next(iter(loader))
    assert batch["images"].shape == (3, 3, 128, 128)
    assert str(broken) not in batch["image_paths"]
    assert sorted(batch["captions"]) == sorted(
        {"img00.png": "c0", "img02.png": "c2"}[p.rsplit("/", 1)[-1]] for p in batch["image_paths"])
    assert "img01.png" in caplog.text and "in its place" in caplog.text


def test_bucket_of_only_damaged_images_is_an_error(tmp_path, image_factory):
    from library.errors import UserError

    make_folder(image_factory, tmp_path / "a", [(64, 64)] * 2)
    for p in (tmp_path / "a").glob("*.png"):
        p.write_bytes(p.read_bytes()[:200])
    sub = db_subset(tmp_path / "a", class_tokens="x", num_repeats=1)
    group = build_dataset_group(group_params(dataset([sub], batch_size=2)), seed=0)
    loader = make_train_loader(group, seed=0, num_workers=0, persistent_workers=False)
    loader.set_epoch(0)
    with pytest.raises(UserError, match=r"img0[01]\.png.*no other image of bucket 128x128"):
        next(iter(loader))
