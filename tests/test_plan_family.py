"""The dataset plan names the model family of every family (through ``ModelFamily.plan_line``): its name, objective,
default resolution, bucket step and VAE factor, above the datasets; ``--debug_dataset`` shows it too."""

from __future__ import annotations

import pytest

from library.dataset.group import build_dataset_group
from library.dataset.loader import make_train_loader
from library.dataset.debug import debug_dataset
from library.models.families.flux import flux_family
from library.models.families.lumina import lumina_family
from library.models.families.sd import sd_family
from library.models.families.sd3 import sd3_family
from library.models.families.sdxl import sdxl_family
from tests.dataset_helpers import dataset, db_subset, group_params, make_folder

FAMILIES = [
    (sd_family(), "model family: sd1 (epsilon prediction; default resolution 512x512, bucket step 64 px"),
    (sd_family(v2=True, v_parameterization=True), "(v prediction; default resolution 768x768"),
    (sdxl_family(), "(epsilon prediction; default resolution 1024x1024, bucket step 32 px"),
    (flux_family("dev"), "(flow matching; default resolution 1024x1024, bucket step 16 px, latents 1/8"),
    (sd3_family("5-medium"), "model family: sd3-5-medium (flow matching; default resolution 1024x1024, bucket step "
                             "16 px"),
    (lumina_family(), "(flow matching; default resolution 1024x1024, bucket step 16 px"),
]


@pytest.fixture()
def group(tmp_path, image_factory):
    make_folder(image_factory, tmp_path / "imgs", [(64, 64)] * 2)
    return build_dataset_group(group_params(dataset([db_subset(tmp_path / "imgs", class_tokens="x")])), seed=0)


@pytest.mark.parametrize("family, expected", FAMILIES, ids=lambda f: getattr(f, "name", ""))
def test_the_plan_starts_with_the_family(group, family, expected):
    first, second = group.plan(family=family).splitlines()[:2]
    assert first.startswith(f"model family: {family.name} (") and expected in first
    assert f"bucket step {family.bucket_step} px" in first and second.startswith("Dataset 0")
    assert not group.plan().startswith("model family")


def test_debug_dataset_shows_the_family(group):
    lines: list[str] = []
    loader = make_train_loader(group, seed=0, num_workers=0, persistent_workers=False)
    debug_dataset(group, loader, max_batches=1, write=lines.append, family=sd3_family("medium"))
    assert lines[0].startswith("model family: sd3-medium (flow matching;")
