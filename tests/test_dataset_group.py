"""Dataset group: scanning, captions/metadata, buckets, repeats, regularization balance, validation, plan."""

from __future__ import annotations

import json
import math
import os

import pytest

from library.dataset.group import balance_regularization, build_dataset_group
from library.dataset.loader import make_train_loader
from library.dataset.images import METADATA_CACHE_NAME, InfoCache
from library.errors import UserError
from tests.dataset_helpers import dataset, db_subset, ft_subset, group_params, make_folder


def _counts(group):
    return {reso: len(s) for ds in group.train for reso, s in ds.buckets.items()}


def test_old_style_folders_repeats_and_buckets(tmp_path, image_factory):
    # what --train_data_dir train/ with "3_sks dog" and --reg_data_dir reg/ with "1_dog" resolve to
    make_folder(image_factory, tmp_path / "train" / "3_sks dog", [(64, 64), (64, 64), (192, 64)])
    make_folder(image_factory, tmp_path / "reg" / "1_dog", [(64, 64)] * 5)
    train = db_subset(tmp_path / "train" / "3_sks dog", origin="--train_data_dir 3_sks dog",
                      class_tokens="sks dog", num_repeats=3)
    reg = db_subset(tmp_path / "reg" / "1_dog", origin="--reg_data_dir 1_dog", class_tokens="dog", is_reg=True)
    ds = dataset([train, reg], origin="command line", enable_bucket=True, batch_size=2, prior_loss_weight=0.5)
    group = build_dataset_group(group_params(ds), seed=1)
    assert group.num_train_images == 9
    assert group.num_reg_images == 5
    d = group.train[0]
    reg_imgs = [i for i in d.images if i.is_reg]
    # 9 training samples: 5 reg images on the first pass, then +1 repeat for the first 4
    assert [i.repeats for i in reg_imgs] == [2, 2, 2, 2, 1]
    assert sum(i.repeats for i in reg_imgs) == 9
    assert all(i.loss_weight == 0.5 for i in reg_imgs)
    assert all(i.loss_weight == 1.0 for i in d.images if not i.is_reg)
    assert {i.record.caption for i in d.images} == {"sks dog", "dog"}
    # square images (bucket 128x128): 2*3 train + 9 reg = 15 samples -> 8 batches, 192x64: 3 samples -> 2 batches
    counts = _counts(group)
    assert counts[(128, 128)] == 15
    wide = [k for k in counts if k != (128, 128)]
    assert len(wide) == 1 and counts[wide[0]] == 3 and wide[0][0] > wide[0][1]
    assert d.num_batches() == 8 + 2
    assert group.batches_per_epoch() == 10
    assert group.batches_per_epoch(num_processes=3) == 4
    assert group.steps_per_epoch(num_processes=1, grad_accum=4) == 3


def test_reg_balance_matches_reference_algorithm(tmp_path, image_factory):
    make_folder(image_factory, tmp_path / "t", [(64, 64)] * 2)
    make_folder(image_factory, tmp_path / "r", [(64, 64)] * 10)
    train = db_subset(tmp_path / "t", class_tokens="a", num_repeats=2)
    reg = db_subset(tmp_path / "r", origin="datasets[0].subsets[1]", class_tokens="b", is_reg=True, num_repeats=1)
    group = build_dataset_group(group_params(dataset([train, reg])), seed=0)
    reg_imgs = [i for i in group.train[0].images if i.is_reg]
    assert len(reg_imgs) == 4  # 4 training samples: the first 4 reg images (sorted by name) are used
    assert [i.record.path.name for i in reg_imgs] == [f"img{i:02d}.png" for i in range(4)]
    plan = group.plan()
    assert "balanced to 4 samples using 4 image(s)" in plan
    assert "6 regularization image(s) not used" in plan


def test_balance_function_with_repeats():
    class Img:
        def __init__(self, r):
            self.repeats = r

    imgs = [Img(3), Img(3)]
    used = balance_regularization(10, imgs)  # 3 + 3 = 6, then +1 each in order until 10
    assert len(used) == 2 and [i.repeats for i in imgs] == [5, 5]
    imgs = [Img(4), Img(4), Img(4)]
    used = balance_regularization(5, imgs)  # 4, then 8 >= 5: stop after the second image
    assert len(used) == 2 and [i.repeats for i in imgs] == [4, 4, 4]
    assert balance_regularization(5, []) == []


def test_caption_files_and_missing_captions_error(tmp_path, image_factory):
    folder = tmp_path / "imgs"
    make_folder(image_factory, folder, [(64, 64)] * 3, captions=["a cat", None, "b cat\nsecond"], caption_ext=".txt")
    sub = db_subset(folder, caption_extension=".txt", class_tokens="sks")
    group = build_dataset_group(group_params(dataset([sub])), seed=0)
    caps = {i.record.path.name: i.record.caption for i in group.train[0].images}
    assert caps == {"img00.png": "a cat", "img01.png": "sks", "img02.png": "b cat\nsecond"}
    no_tokens = db_subset(folder, caption_extension=".txt")
    with pytest.raises(UserError) as err:
        build_dataset_group(group_params(dataset([no_tokens])), seed=0)
    assert "img01.png" in err.value.message and "class_tokens" in err.value.message
    assert "img00.png" not in err.value.message


def test_captions_with_another_extension_are_pointed_out(tmp_path, image_factory):
    # taggers write .txt while the default caption_extension is .caption: the classic silent mistake
    folder = tmp_path / "imgs"
    make_folder(image_factory, folder, [(64, 64)] * 2, captions=["a cat", "b cat"], caption_ext=".txt")
    group = build_dataset_group(group_params(dataset([db_subset(folder, class_tokens="sks")])), seed=0)
    assert {i.record.caption for i in group.train[0].images} == {"sks"}
    assert any("have '<name>.txt' files; set caption_extension = '.txt'" in n for n in group.notes)
    with pytest.raises(UserError, match=r"set caption_extension = '\.txt' if those are their captions"):
        build_dataset_group(group_params(dataset([db_subset(folder)])), seed=0)
    right = build_dataset_group(group_params(dataset([db_subset(folder, caption_extension=".txt")])), seed=0)
    assert not any("caption_extension" in n for n in right.notes)


def test_corrupt_image_is_skipped_and_named(tmp_path, image_factory, capsys):
    folder = tmp_path / "imgs"
    make_folder(image_factory, folder, [(64, 64)] * 2)
    (folder / "broken.png").write_bytes(b"this is not a png")
    (folder / "empty.jpg").write_bytes(b"")
    group = build_dataset_group(group_params(dataset([db_subset(folder, class_tokens="x")])), seed=0)
    assert len(group.train[0].images) == 2
    names = " ".join(group.skipped)
    assert "broken.png" in names and "empty.jpg" in names
    assert "broken.png" in capsys.readouterr().err
    plan = group.plan()
    assert "Skipped (2)" in plan and "broken.png" in plan


def test_no_images_is_a_clear_error(tmp_path, image_factory):
    make_folder(image_factory, tmp_path / "parent" / "10_sks", [(64, 64)])
    # pointing image_dir at the parent folder (the classic mistake) finds no images
    with pytest.raises(UserError) as err:
        build_dataset_group(group_params(dataset([db_subset(tmp_path / "parent", class_tokens="x")])), seed=0)
    assert "sub-folders (10_sks): give the folder that holds the images" in err.value.message
    assert "metadata keys" not in err.value.message
    with pytest.raises(UserError) as err:
        build_dataset_group(group_params(dataset([db_subset(tmp_path / "nope", class_tokens="x")])), seed=0)
    assert "nope" in err.value.message and "not a folder" in err.value.message


def test_cache_info_written_reused_and_invalidated(tmp_path, image_factory):
    folder = tmp_path / "imgs"
    paths = make_folder(image_factory, folder, [(64, 64), (192, 64)], captions=["one", "two"])
    sub = db_subset(folder, cache_info=True, class_tokens="x")
    build_dataset_group(group_params(dataset([sub])), seed=0)
    data = json.loads((folder / METADATA_CACHE_NAME).read_text())
    assert data["img00.png"]["caption"] == "one" and data["img01.png"]["resolution"] == [192, 64]

    # a cached entry is trusted while the file is unchanged: prove it by editing only the cache
    data["img00.png"]["caption"] = "from cache"
    (folder / METADATA_CACHE_NAME).write_text(json.dumps(data))
    group = build_dataset_group(group_params(dataset([sub])), seed=0)
    caps = {i.record.path.name: i.record.caption for i in group.train[0].images}
    assert caps["img00.png"] == "from cache"

    # changing the image (size and mtime) or its caption file invalidates that entry only
    image_factory(paths[1], (64, 128), seed=9)
    os.utime(paths[1], ns=(1, 1))
    paths[0].with_suffix(".caption").write_text("edited caption", encoding="utf-8")
    group = build_dataset_group(group_params(dataset([sub])), seed=0)
    by_name = {i.record.path.name: i for i in group.train[0].images}
    assert by_name["img00.png"].record.caption == "edited caption"
    assert by_name["img01.png"].record.size == (64, 128)
    data = json.loads((folder / METADATA_CACHE_NAME).read_text())
    assert data["img01.png"]["resolution"] == [64, 128] and data["img00.png"]["caption"] == "edited caption"

    # sd-scripts' format (absolute keys, no file stamps) is not trusted: rebuilt
    (folder / METADATA_CACHE_NAME).write_text(json.dumps({str(paths[0]): {"caption": "stale", "resolution": [9, 9]}}))
    group = build_dataset_group(group_params(dataset([sub])), seed=0)
    assert {i.record.caption for i in group.train[0].images} == {"edited caption", "two"}
    assert set(json.loads((folder / METADATA_CACHE_NAME).read_text())) == {"img00.png", "img01.png"}

    # a deleted image disappears from the cache
    paths[1].unlink()
    build_dataset_group(group_params(dataset([sub])), seed=0)
    assert set(InfoCache(folder).entries) == {"img00.png"}


def test_finetuning_json_with_stems_and_jsonl(tmp_path, image_factory):
    folder = tmp_path / "ft"
    a, b, c = make_folder(image_factory, folder, [(64, 64), (128, 64), (64, 64)])
    image_factory(folder / "photo.JPG", (64, 128))
    meta = {
        "img00": {"caption": "a stem key", "tags": "t1, t2"},  # extension-less stem (merge_captions default)
        "img01.png": {"caption": "relative with ext", "image_size": [128, 64]},
        str(c): {"tags": "only tags"},  # absolute
        "photo": {"caption": "upper-case extension"},
        "missing": {"caption": "no such image"},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    sub = ft_subset(tmp_path / "meta.json", folder)
    group = build_dataset_group(group_params(dataset([sub], kind="finetuning")), seed=0)
    caps = {i.record.path.name: i.record.caption for i in group.train[0].images}
    assert caps == {
        "img00.png": "a stem key, t1, t2",
        "img01.png": "relative with ext",
        "img02.png": "only tags",
        "photo.JPG": "upper-case extension",
    }
    assert any("'missing'" in s and "not found" in s for s in group.skipped)

    lines = [
        {"image_path": str(a), "caption": "line one"},
        {"image_path": "img01.png", "caption": "line two", "tags": "x"},
    ]
    (tmp_path / "meta.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    sub = ft_subset(tmp_path / "meta.jsonl", folder, caption_separator=";")
    group = build_dataset_group(group_params(dataset([sub], kind="finetuning")), seed=0)
    caps = sorted(i.record.caption for i in group.train[0].images)
    assert caps == ["line one", "line two; x"]


def test_finetuning_without_matching_images_explains_the_keys(tmp_path, image_factory):
    make_folder(image_factory, tmp_path / "ft", [(64, 64)])
    (tmp_path / "m.json").write_text(json.dumps({"other": {"caption": "x"}}))
    with pytest.raises(UserError) as err:
        build_dataset_group(group_params(dataset([ft_subset(tmp_path / "m.json", tmp_path / "ft")],
                                                 kind="finetuning")), seed=0)
    assert "'other': image not found" in err.value.message
    assert "metadata keys must name the images" in err.value.message
    assert "<repeats>_" not in err.value.message


def test_finetuning_bad_metadata_is_user_error(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError) as err:
        build_dataset_group(group_params(dataset([ft_subset(tmp_path / "bad.json", tmp_path)],
                                                 kind="finetuning")), seed=0)
    assert "bad.json" in err.value.message and "not valid JSON" in err.value.message


def test_validation_split_disjoint_deterministic(tmp_path, image_factory):
    make_folder(image_factory, tmp_path / "a", [(64, 64)] * 10)
    make_folder(image_factory, tmp_path / "r", [(64, 64)] * 4)
    make_folder(image_factory, tmp_path / "ft", [(64, 64)] * 5)
    (tmp_path / "m.json").write_text(json.dumps({f"img{i:02d}": {"caption": str(i)} for i in range(5)}))

    def build(seed, vseed=None):
        db = dataset([db_subset(tmp_path / "a", class_tokens="x", num_repeats=2),
                      db_subset(tmp_path / "r", origin="datasets[0].subsets[1]", class_tokens="y", is_reg=True)],
                     validation_split=0.3, validation_seed=vseed)
        ft = dataset([ft_subset(tmp_path / "m.json", tmp_path / "ft", origin="datasets[1].subsets[0]")],
                     origin="datasets[1]", kind="finetuning", validation_split=0.4)
        return build_dataset_group(group_params(db, ft), seed=seed)

    g = build(seed=5)
    assert len(g.validation) == 2
    for tr, va in zip(g.train, g.validation):
        train_paths = {i.record.path for i in tr.images}
        val_paths = {i.record.path for i in va.images}
        assert not train_paths & val_paths
        assert all(not i.is_reg and i.repeats == 1 for i in va.images)
    db_val = {i.record.path.name for i in g.validation[0].images}
    assert len(db_val) == 3  # floor(10 * 0.3); reg images never go to validation
    assert len(g.validation[1].images) == 2  # fine-tuning datasets are split too
    assert g.num_train_images == 7 * 2 + 3
    assert {i.record.path.name for i in build(seed=5).validation[0].images} == db_val
    others = [{i.record.path.name for i in build(seed=s).validation[0].images} for s in range(6, 12)]
    assert any(o != db_val for o in others)
    # validation_seed overrides the run seed
    fixed = [{i.record.path.name for i in build(seed=s, vseed=3).validation[0].images} for s in (1, 2)]
    assert fixed[0] == fixed[1]
    plan = g.plan()
    assert "3 held out for validation" in plan and "Validation:" in plan


def test_epoch_batches_single_bucket_and_counts(tmp_path, image_factory):
    sizes = [(64, 64)] * 5 + [(192, 64)] * 3 + [(64, 192)] * 2
    make_folder(image_factory, tmp_path / "a", sizes)
    ds = dataset([db_subset(tmp_path / "a", class_tokens="x", num_repeats=2)], enable_bucket=True, batch_size=4)
    group = build_dataset_group(group_params(ds), seed=0)
    d = group.train[0]
    expected = sum(math.ceil(len(s) / 4) for s in d.buckets.values())
    assert expected == 3 + 2 + 1
    for epoch in range(3):
        refs = group.epoch_batches(7, epoch)
        assert len(refs) == expected == group.batches_per_epoch()
        seen = []
        for r in refs:
            buckets = {d.images[i].choice.bucket for i in r.samples}
            assert len(buckets) == 1 and 1 <= len(r.samples) <= 4
            seen += r.samples
        assert sorted(seen) == sorted(i for s in d.buckets.values() for i in s)
    assert [r.samples for r in group.epoch_batches(7, 1)] == [r.samples for r in group.epoch_batches(7, 1)]
    assert [r.samples for r in group.epoch_batches(7, 1)] != [r.samples for r in group.epoch_batches(7, 2)]
    assert len(group.epoch_batches(-5, 0)) == expected  # any int seed works


def test_plan_contents(tmp_path, image_factory):
    make_folder(image_factory, tmp_path / "a", [(64, 64)] * 4 + [(192, 64)] * 2)
    (tmp_path / "a" / "bad.webp").write_bytes(b"garbage")
    ds = dataset([db_subset(tmp_path / "a", class_tokens="x", num_repeats=3)], enable_bucket=True, batch_size=2,
                 network_multiplier=0.7)
    group = build_dataset_group(group_params(ds), seed=0)
    plan = group.plan(num_processes=2, grad_accum=2, epochs=4, steps=100)
    assert "6 images x 3 repeats = 18 samples" in plan
    assert "128x128:     12 samples,     6 batches" in plan
    assert "batch size 2" in plan and "network_multiplier 0.7" in plan
    assert "Batches per epoch: 9 in all; 5 per process with 2 process(es); 3 optimizer steps per epoch" in plan
    assert "4 epoch(s) -> 12 optimizer steps" in plan
    assert "100 steps -> 34 epoch(s)" in plan
    assert "bad.webp" in plan


def test_bucket_no_upscale_too_small_image_skipped(tmp_path, image_factory):
    make_folder(image_factory, tmp_path / "a", [(64, 64), (32, 200)])
    ds = dataset([db_subset(tmp_path / "a", class_tokens="x")], enable_bucket=True, bucket_no_upscale=True)
    group = build_dataset_group(group_params(ds), seed=0)
    assert len(group.train[0].images) == 1
    assert any("img01.png" in s for s in group.skipped)


def _resolve(argv):
    from library.config.arguments import dataset_parser
    from library.config.dataset_config import resolve_dataset_params
    from library.config.params import DatasetSupport

    support = DatasetSupport()
    return resolve_dataset_params(dataset_parser(support).parse_args(argv), support)


def test_through_config_old_style_folders(tmp_path, image_factory):
    make_folder(image_factory, tmp_path / "train" / "4_sks dog", [(64, 64)] * 2)
    make_folder(image_factory, tmp_path / "train" / "2_my_char", [(64, 64)], captions=["custom caption"])
    make_folder(image_factory, tmp_path / "reg" / "1_dog", [(64, 64)] * 20)
    params = _resolve(["--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
                       "--resolution", "128", "--min_bucket_reso", "64", "--max_bucket_reso", "256",
                       "--train_batch_size", "4", "--enable_bucket"])
    group = build_dataset_group(params, seed=0)
    assert group.num_train_images == 4 * 2 + 2 * 1
    caps = sorted({i.record.caption for i in group.train[0].images})
    assert caps == ["custom caption", "dog", "sks dog"]
    reg = [i for i in group.train[0].images if i.is_reg]
    assert len(reg) == 10 and all(i.repeats == 1 for i in reg)  # 10 samples of 20 reg images
    assert group.batches_per_epoch() == 5
    assert "10 regularization image(s) not used" in group.plan()


def test_through_config_toml_two_kinds(tmp_path, image_factory):
    make_folder(image_factory, tmp_path / "db", [(64, 64)] * 3)
    make_folder(image_factory, tmp_path / "ft", [(64, 64), (192, 64)])
    (tmp_path / "ft" / "meta.json").write_text(json.dumps({"img00": {"caption": "c0"}, "img01": {"tags": "t"}}))
    toml = tmp_path / "data.toml"
    toml.write_text(f"""
[general]
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 256

[[datasets]]
resolution = 128
batch_size = 2
network_multiplier = 0.5
  [[datasets.subsets]]
  image_dir = '{tmp_path / "db"}'
  class_tokens = 'sks'
  num_repeats = 3

[[datasets]]
resolution = [128, 128]
  [[datasets.subsets]]
  image_dir = '{tmp_path / "ft"}'
  metadata_file = '{tmp_path / "ft" / "meta.json"}'
""")
    group = build_dataset_group(_resolve(["--dataset_config", str(toml)]), seed=0)
    assert [d.params.kind for d in group.train] == ["dreambooth", "finetuning"]
    assert group.train[0].num_batches() == 5 and group.train[1].num_batches() == 2
    assert group.batches_per_epoch() == 7
    plan = group.plan()
    assert "network_multiplier 0.5" in plan and "3 images x 3 repeats = 9 samples" in plan


def test_finetuning_wildcard_tags_on_every_line(tmp_path, image_factory):
    make_folder(image_factory, tmp_path / "ft", [(64, 64)])
    (tmp_path / "m.json").write_text(json.dumps({"img00": {"caption": "one\ntwo", "tags": "x, y"}}))
    sub = ft_subset(tmp_path / "m.json", tmp_path / "ft", enable_wildcard=True)
    group = build_dataset_group(group_params(dataset([sub], kind="finetuning")), seed=0)
    assert group.train[0].images[0].record.caption == "one, x, y\ntwo, x, y"


def test_finetuning_multiline_caption_keeps_tags_without_wildcard(tmp_path, image_factory):
    # merge_captions_to_metadata keeps multi-line captions; the first line is trained on and needs the tags
    make_folder(image_factory, tmp_path / "ft", [(64, 64)])
    (tmp_path / "m.json").write_text(json.dumps({"img00": {"caption": "one\ntwo", "tags": "x, y"}}))
    sub = ft_subset(tmp_path / "m.json", tmp_path / "ft")
    group = build_dataset_group(group_params(dataset([sub], kind="finetuning")), seed=0)
    loader = make_train_loader(group, seed=0, num_workers=0, persistent_workers=False)
    loader.set_epoch(0)
    assert next(iter(loader))["captions"] == ["one, x, y"]


def test_split_never_overlaps():
    from library.dataset.group import _split_validation

    for n in range(0, 25):
        records = list(range(n))
        for split in (0.1, 0.25, 0.3, 0.5, 0.9):
            train, val = _split_validation(records, split, seed=3, dataset_index=0, subset_index=0)
            assert not set(train) & set(val) and sorted(train + val) == records
            assert len(val) == int(n * split + 1e-9)
    train, val = _split_validation([0, 1, 2], 0.5, seed=0, dataset_index=0, subset_index=0)
    assert (len(train), len(val)) == (2, 1)  # sd-scripts overlaps here (train 2 + val 2 of 3)
