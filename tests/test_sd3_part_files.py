"""SD3 part files in the wrong place (a CLIP-G file as --clip_l, a CLIP-L file as --clip_g, a T5 file as either, a
CLIP file as --t5xxl): one message before any model loads, naming the file, what it holds and its option."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.models.families import resolve_family
from library.models.sd3.loading import part_of_file
from library.models.sd3.tiny import TinySD3Config, save_tiny_sd3_files


def clip_header_file(path: Path, width: int) -> Path:
    """A file with a full-size CLIP's position embedding only: enough for the header checks (nothing loads)."""
    save_file({"text_model.embeddings.position_embedding.weight": torch.zeros(77, width, dtype=torch.float16),
               "text_model.final_layer_norm.weight": torch.zeros(width, dtype=torch.float16)}, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3parts")
    parts = save_tiny_sd3_files(root / "m", TinySD3Config(variant="medium"), bundled=False)
    parts["real_l"] = clip_header_file(root / "clip_l_768.safetensors", 768)
    parts["real_g"] = clip_header_file(root / "clip_g_1280.safetensors", 1280)
    return parts


def _problems(files, **given) -> str:
    roles = {"clip_l": files["clip_l"], "clip_g": files["clip_g"], "t5xxl": files["t5xxl"], "vae": files["vae"]}
    roles.update({k: files[v] for k, v in given.items()})
    args = argparse.Namespace(pretrained_model_name_or_path=str(files["sd3"]), mixed_precision="no",
                              tokenizer_cache_dir=None, pos_emb_random_crop_rate=0.0, enable_scaled_pos_embed=False,
                              **{k: str(v) for k, v in roles.items()})
    with pytest.raises(UserError) as err:
        resolve_family(args, ("sd3",))
    return str(err.value)


def test_what_a_part_file_is_from_its_header(files):
    from library.models.sd3.loading import _header_shapes

    assert part_of_file(_header_shapes(files["real_g"])) == ("clip_g", "a CLIP-G text encoder (1280 wide)")
    assert part_of_file(_header_shapes(files["real_l"])) == ("clip_l", "a CLIP-L text encoder (768 wide)")
    assert part_of_file(_header_shapes(files["clip_l"])) == ("clip", "a CLIP text encoder")  # tiny: 16 wide
    assert part_of_file(_header_shapes(files["t5xxl"])) == ("t5xxl", "a T5 text encoder")
    assert part_of_file(_header_shapes(files["vae"]))[0] == "vae"


@pytest.mark.parametrize("given, message", [
    ({"clip_l": "real_g"}, "--clip_l {real_g}: this file is a CLIP-G text encoder (1280 wide), not a CLIP-L text "
                           "encoder; it belongs to --clip_g; give --clip_l a CLIP-L text encoder file"),
    ({"clip_g": "real_l"}, "--clip_g {real_l}: this file is a CLIP-L text encoder (768 wide), not a CLIP-G text "
                           "encoder; it belongs to --clip_l; give --clip_g a CLIP-G text encoder file"),
    ({"clip_l": "t5xxl"}, "--clip_l {t5xxl}: this file is a T5 text encoder, not a CLIP-L text encoder; it belongs "
                          "to --t5xxl"),
    ({"clip_g": "t5xxl"}, "--clip_g {t5xxl}: this file is a T5 text encoder, not a CLIP-G text encoder; it belongs "
                          "to --t5xxl"),
    ({"t5xxl": "real_g"}, "--t5xxl {real_g}: this file is a CLIP-G text encoder (1280 wide), not a T5 text "
                          "encoder; it belongs to --clip_g"),
    ({"t5xxl": "clip_l"}, "--t5xxl {clip_l}: this file is a CLIP text encoder, not a T5 text encoder; it belongs "
                          "to --clip_l or --clip_g"),
    ({"clip_l": "vae"}, "it belongs to --vae"),
])
def test_a_part_in_the_wrong_place_is_named_with_its_option(files, given, message):
    text = _problems(files, **given)
    assert message.format(**{k: files[k] for k in ("real_g", "real_l", "t5xxl", "clip_l")}) in text
    assert text.count("this file is") == 1  # one problem, the other parts are fine


def test_swapped_clips_are_both_named(files):
    text = _problems(files, clip_l="real_g", clip_g="real_l")
    assert "--clip_l" in text and "it belongs to --clip_g" in text
    assert "--clip_g" in text and "it belongs to --clip_l" in text
