"""LoRA files: saving (formats, dtypes, metadata, hashes, atomicity), loading (errors), network options."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import networks.lora as lora
from library.errors import UserError
from library.models import metadata as md
from library.training.network_args import add_network_arguments, network_option_problems, parse_network_args
from tests.test_lora_network import tiny_models


def independent_data_hash(path: Path) -> str:
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header :]).hexdigest()


def independent_legacy_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()[0x100000:0x110000]).hexdigest()[:8]


@pytest.fixture
def network():
    te, unet = tiny_models()
    net = lora.create_network(1.0, 4, 2, None, te, unet)
    with torch.no_grad():
        for m in net.all_loras():
            m.lora_up.weight.normal_()
    net.apply_to(te, unet)
    return net


def test_model_hashes_match_independent_computation(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"b.lora_up.weight": torch.randn(512, 600, generator=gen), "a.alpha": torch.tensor(4.0)}
    meta = {"ss_network_dim": "4", "ss_output_name": "x", "modelspec.title": "not hashed"}
    model_hash, legacy_hash = md.model_hashes(tensors, meta)
    reference = tmp_path / "ref.safetensors"
    save_file(tensors, str(reference), {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert reference.stat().st_size > 0x110000
    assert model_hash == independent_data_hash(reference)
    assert legacy_hash == independent_legacy_hash(reference)
    assert len(model_hash) == 64 and len(legacy_hash) == 8
    written = md.save_safetensors(tmp_path / "out.safetensors", tensors, meta)
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        stored = f.metadata()
    assert stored == written
    assert stored["sshs_model_hash"] == model_hash == independent_data_hash(tmp_path / "out.safetensors")
    assert stored["sshs_legacy_hash"] == legacy_hash
    assert stored["modelspec.title"] == "not hashed"


def test_file_hashes(tmp_path):
    path = tmp_path / "model.ckpt"
    data = bytes(range(256)) * 5000  # 1.28 MB
    path.write_bytes(data)
    legacy, full = md.file_hashes(path)
    assert full == hashlib.sha256(data).hexdigest()
    assert legacy == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    with pytest.raises(ValueError):
        md.file_hashes(tmp_path)


def test_save_weights_safetensors_metadata_and_dtypes(network, tmp_path):
    expected = {k: v.detach().clone() for k, v in network.state_dict().items()}
    spec = md.modelspec("stable-diffusion-v1/lora", title="cat", resolution=(512, 768), timestamp=0, encoder_layer=2,
                        author="me", tags=["a", "b"])
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0", **spec}
    for dtype in (torch.float16, torch.bfloat16, torch.float32, None):
        path = tmp_path / f"lora_{dtype}.safetensors"
        network.save_weights(str(path), dtype, dict(meta))
        loaded = load_file(str(path))
        assert set(loaded) == set(expected)
        assert {v.dtype for v in loaded.values()} == {dtype or torch.float32}
        for key, value in expected.items():
            assert torch.allclose(loaded[key].float(), value.to(dtype or torch.float32).float())
        with safe_open(str(path), "pt") as f:
            stored = f.metadata()
        assert stored["ss_network_dim"] == "4" and stored["modelspec.title"] == "cat"
        assert stored["sshs_model_hash"] == independent_data_hash(path)
    assert float(loaded["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"]) == 2.0
    assert spec["modelspec.sai_model_spec"] == "1.0.1"
    assert spec["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert spec["modelspec.implementation"] == "diffusers"
    assert spec["modelspec.resolution"] == "512x768"
    assert spec["modelspec.prediction_type"] == "epsilon"
    assert spec["modelspec.encoder_layer"] == "2"
    assert spec["modelspec.tags"] == "a,b" and spec["modelspec.author"] == "me"
    assert spec["modelspec.date"].startswith("19")  # local time of timestamp 0, ISO 8601
    assert "modelspec.license" not in spec and "modelspec.description" not in spec
    with pytest.raises(TypeError, match="ss_network_dim"):
        md.save_safetensors(tmp_path / "bad.safetensors", expected, {"ss_network_dim": 4})


def test_no_metadata_keeps_minimum_keys(tmp_path):
    meta = {k: "x" for k in md.MINIMUM_METADATA_KEYS}
    meta.update({"ss_learning_rate": "1e-4", "ss_tag_frequency": "{}", "ss_seed": "1"})
    meta.update(md.modelspec("stable-diffusion-v1/lora", title="t", resolution=512, timestamp=1))
    path = tmp_path / "min.safetensors"
    written = md.save_safetensors(path, {"a.alpha": torch.tensor(1.0)}, meta, minimal=True)
    expected_keys = set(md.MINIMUM_METADATA_KEYS) | {k for k in meta if k.startswith("modelspec.")}
    assert set(written) == expected_keys | {"sshs_model_hash", "sshs_legacy_hash"}
    with safe_open(str(path), "pt") as f:
        assert set(f.metadata()) == set(written)
    assert set(md.save_safetensors(tmp_path / "none.safetensors", {"a.alpha": torch.tensor(1.0)}, None)) == {
        "sshs_model_hash",
        "sshs_legacy_hash",
    }


def test_save_ckpt_and_pt(network, tmp_path):
    for suffix in (".ckpt", ".pt"):
        path = tmp_path / f"lora{suffix}"
        network.save_weights(str(path), torch.float16, {"ss_x": "ignored"})
        loaded = torch.load(path, weights_only=True)
        assert set(loaded) == set(network.state_dict())
        assert all(v.dtype == torch.float16 for v in loaded.values())


def test_save_is_atomic(network, tmp_path, monkeypatch):
    path = tmp_path / "lora.pt"
    path.write_bytes(b"previous file")

    def crash(obj, f):
        Path(f).write_bytes(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        network.save_weights(str(path), None, None)
    assert path.read_bytes() == b"previous file"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.pt"]
    monkeypatch.undo()
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"x" * 10_000_000)
    network.save_weights(str(target), None, {})
    assert len(load_file(str(target))) == len(network.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.pt", "lora.safetensors"]


def test_load_weights_roundtrip_and_errors(network, tmp_path):
    path = tmp_path / "lora.safetensors"
    network.save_weights(str(path), None, {})
    te, unet = tiny_models()
    fresh = lora.create_network(1.0, 4, 1, None, te, unet)
    fresh.apply_to(te, unet)
    fresh.load_weights(str(path))
    for key, value in network.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    assert {m.scale for m in fresh.all_loras()} == {0.5}  # alpha 2 / rank 4 from the file

    sd = load_file(str(path))
    extra = dict(sd, **{"lora_unet_foo_bar.lora_down.weight": torch.zeros(4, 8)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(UserError, match="lora_unet_foo_bar.lora_down.weight(.|\n)*add --dim_from_weights"):
        fresh.load_weights(str(tmp_path / "extra.safetensors"))
    missing = {k: v for k, v in sd.items() if not k.startswith("lora_te_text_model_encoder_layers_1_mlp_fc2")}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match="not in the file.*layers_1_mlp_fc2"):
        fresh.load_weights(str(tmp_path / "missing.safetensors"))
    te, unet = tiny_models()
    other_rank = lora.create_network(1.0, 8, 1, None, te, unet)
    with pytest.raises(UserError, match="dim_from_weights"):
        other_rank.load_weights(str(path))
    with pytest.raises(UserError, match="not found"):
        fresh.load_weights(str(tmp_path / "nope.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="garbage.safetensors"):
        fresh.load_weights(str(tmp_path / "garbage.safetensors"))


def test_load_old_names_and_files_without_alpha(network, tmp_path):
    sd = {k: v.detach() for k, v in network.state_dict().items()}
    # sd-scripts under transformers 5 writes text encoder names without "text_model_"; old files have no alpha
    legacy = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in sd.items() if not k.endswith(".alpha")}
    assert any(k.startswith("lora_te_encoder_layers_0") for k in legacy)
    path = tmp_path / "old.ckpt"
    torch.save(legacy, path)
    te, unet = tiny_models()
    fresh = lora.create_network(1.0, 4, 1, None, te, unet)
    fresh.load_weights(str(path))
    assert {float(m.alpha) for m in fresh.all_loras()} == {4.0} and {m.scale for m in fresh.all_loras()} == {1.0}
    assert torch.equal(
        fresh.state_dict()["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"],
        sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"],
    )
    from_file, weights = lora.create_network_from_weights(1.0, str(path), None, te, unet)
    assert {m.lora_dim for m in from_file.all_loras()} == {4} and {m.scale for m in from_file.all_loras()} == {1.0}
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in weights)


def test_network_train_unet_only_file(tmp_path):
    te, unet = tiny_models()
    net = lora.create_network(1.0, 4, 1, None, te, unet)
    net.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
    net.save_weights(str(tmp_path / "u.safetensors"), None, None)
    keys = load_file(str(tmp_path / "u.safetensors")).keys()
    assert len(keys) == 360 and all(k.startswith("lora_unet_") for k in keys)


def test_parse_network_args():
    assert parse_network_args(None) == {}
    assert parse_network_args(["conv_dim=4", " conv_alpha = 1 ", "down_lr_weight=1,1,0"]) == {
        "conv_dim": "4",
        "conv_alpha": "1",
        "down_lr_weight": "1,1,0",
    }
    with pytest.raises(UserError, match="'conv_dim4' is not key=value"):
        parse_network_args(["conv_dim4"])
    with pytest.raises(UserError, match="did you mean 'conv_alpha'"):
        parse_network_args(["conv_alpa=1"])
    with pytest.raises(UserError, match="conv_dim='four'.*integer"):
        parse_network_args(["conv_dim=four"])
    with pytest.raises(UserError, match="given twice"):
        parse_network_args(["conv_dim=4", "conv_dim=8"])
    with pytest.raises(UserError, match="rank_dropout.*probability"):
        parse_network_args(["rank_dropout=1.5"])
    # other modules get their arguments unchecked
    assert parse_network_args(["algo=loha", "preset=full"], "lycoris.kohya") == {"algo": "loha", "preset": "full"}


def test_add_network_arguments_defaults_and_problems(tmp_path):
    parser = argparse.ArgumentParser()
    add_network_arguments(parser)
    args = parser.parse_args([])
    assert args.network_module == "networks.lora" and args.network_alpha == 1 and args.network_dim is None
    assert args.save_model_as == "safetensors" and args.text_encoder_lr is None and not args.no_metadata
    assert network_option_problems(args) == []
    args = parser.parse_args(
        ["--network_args", "conv_dim=4", "conv_alpah=1", "--text_encoder_lr", "1e-4", "2e-4", "--dim_from_weights",
         "--base_weights", str(tmp_path / "a.safetensors"), "--base_weights_multiplier", "0.5", "1.0",
         "--network_train_unet_only", "--network_train_text_encoder_only"]
    )
    assert args.text_encoder_lr == [1e-4, 2e-4]
    problems = "\n".join(network_option_problems(args))
    for text in ("exclude each other", "--dim_from_weights needs --network_weights", "a.safetensors: no such file",
                 "2 values for 1", "did you mean 'conv_alpha'"):
        assert text in problems
    with pytest.raises(SystemExit):
        parser.parse_args(["--save_model_as", "diffusers"])


def test_network_args_metadata_roundtrip():
    # ss_network_args is JSON of the parsed dict: the file tells how to rebuild the network
    parsed = parse_network_args(["conv_dim=4", "conv_alpha=2"])
    assert json.loads(json.dumps(parsed)) == {"conv_dim": "4", "conv_alpha": "2"}
    options = lora.parse_network_kwargs(parsed, 8, 4)
    assert (options.conv_dim, options.conv_alpha, options.dim, options.alpha) == (4, 2.0, 8, 4.0)


def test_load_full_file_into_unet_only_network_explains(network, tmp_path):
    path = tmp_path / "full.safetensors"
    network.save_weights(str(path), None, None)
    te, unet = tiny_models()
    unet_only = lora.create_network(1.0, 4, 1, None, te, unet)
    unet_only.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
    with pytest.raises(UserError, match="drop --network_train_unet_only") as err:
        unet_only.load_weights(str(path))
    assert "--dim_from_weights" not in err.value.message  # the one cause is named, no other guess


def test_pickle_lora_that_would_run_code_is_refused_with_an_explanation(network, tmp_path):
    marker = tmp_path / "pwned.txt"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    evil = tmp_path / "evil.pt"
    torch.save({**network.state_dict(), "payload": Payload()}, evil)
    te, unet = tiny_models()
    for load in (lambda: lora.create_network_from_weights(1.0, str(evil), None, te, unet),
                 lambda: network.load_weights(str(evil))):
        with pytest.raises(UserError) as err:
            load()
        assert "evil.pt: refused to load this pickle file" in err.value.message
        assert "weights_only" not in err.value.message and "\x1b[" not in err.value.message
    assert not marker.exists()
    (tmp_path / "cut.ckpt").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cut.ckpt: cannot read"):
        lora.load_lora_file(tmp_path / "cut.ckpt")


def test_model_names_in_metadata(tmp_path):
    from library.config.params import DatasetGroupParams
    from library.training.lora_metadata import DatasetStats, RunFacts, build_lora_metadata

    model = tmp_path / "models" / "my-model.safetensors"
    model.parent.mkdir()
    model.write_bytes(b"x")
    folder = tmp_path / "models" / "sd15-diffusers"
    folder.mkdir()
    args = argparse.Namespace(dataset_config="datasets.toml", network_dim=8, network_alpha=4.0,
                              network_args=["conv_dim=2"])
    names = {}
    for given in (str(model), str(folder) + "/", "someone/tiny-sd"):
        facts = RunFacts(session_id=1, started_at=0.0, num_train_images=1, num_validation_images=0, num_reg_images=0,
                         num_batches_per_epoch=1, num_epochs=1, max_train_steps=1, seed=1, optimizer="AdamW",
                         base_model_version="sd_v1", v2=False, model_name=given)
        meta = build_lora_metadata(args, DatasetGroupParams(datasets=[], source="x"), DatasetStats(), facts,
                                   num_processes=1)
        names[given] = meta["ss_sd_model_name"]
        assert all(isinstance(v, str) for v in meta.values())
    # a local file or folder by its name (no private paths in shared files), a Hub id as given
    assert list(names.values()) == ["my-model.safetensors", "sd15-diffusers", "someone/tiny-sd"]
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "4.0")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2"}
