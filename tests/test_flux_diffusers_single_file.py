"""diffusers reads what flux_train.py saves. Its FLUX single-file converter hard-codes FLUX.1's width (3072),
so the model here has that width with one double and one single block: about 0.5 G parameters, 3.3 GB of RAM
and half a minute on one CPU thread, hence the slow mark."""

import json

import pytest
import torch

from library.models.flux.saving import save_flux_transformer
from library.models.flux.tiny import TinyFluxConfig


@pytest.mark.slow
def test_diffusers_from_single_file_reads_our_bfl_file_bit_exact(tmp_path):
    from diffusers import FluxTransformer2DModel

    config = TinyFluxConfig(depth=1, depth_single=1, heads=24, head_dim=128)
    arch = config.architecture()
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**arch.diffusers_config()).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().any():
                p.normal_(0.0, 0.02)
    path = tmp_path / "flux.safetensors"
    save_flux_transformer(path, model, dtype=torch.bfloat16, metadata=None)  # flux_train.py's writer
    (tmp_path / "config" / "transformer").mkdir(parents=True)
    (tmp_path / "config" / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "FluxTransformer2DModel", **arch.diffusers_config()}))

    loaded = FluxTransformer2DModel.from_single_file(str(path), config=str(tmp_path / "config"),
                                                     subfolder="transformer", local_files_only=True,
                                                     torch_dtype=torch.bfloat16).state_dict()
    ours = model.state_dict()
    assert ours.keys() == loaded.keys()
    assert all(torch.equal(ours[k], loaded[k]) for k in ours)
