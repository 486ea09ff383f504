"""sd3_train_network.py in two real processes (accelerate launch --multi_gpu --num_processes 2; CPU gloo): each
process trains on its share of the batches, both end with the same LoRA weights, and one LoRA file is saved."""

from __future__ import annotations

import textwrap

import torch
from safetensors.torch import load_file

from family_helpers import run_two_processes, two_process_dataset
from library.models.sd3.tiny import TinySD3Config, save_tiny_sd3_files
from train_helpers import train_args

# sd3_train_network.main, keeping the run to write each process's trained network beside the outputs
DRIVER = textwrap.dedent("""
    import sys
    from safetensors.torch import save_file
    import sd3_train_network
    from library.config.arguments import SUPPORT_TRAIN_NETWORK
    from library.config.run_config import load_run_config
    from library.models.sd3.arguments import sd3_ss_metadata
    from library.models.sd3.recipe import SD3LoRARecipe
    from library.training.lora_metadata import lora_metadata_for_run
    from library.training.loop import prepare_training, train

    args = load_run_config(sd3_train_network.build_parser(), sys.argv[1:])
    run = prepare_training(args, SD3LoRARecipe(args), SUPPORT_TRAIN_NETWORK, tracker_name="sd3_network_train",
                           metadata=lambda r: {**lora_metadata_for_run(r), **sd3_ss_metadata(r.args)},
                           families=("sd3",))
    train(run)
    weights = {k: v.detach().contiguous() for k, v in run.recipe.network.state_dict().items()}
    save_file(weights, f"{args.output_dir}/../rank{run.accelerator.process_index}.safetensors")
    run.accelerator.end_training()
""")


def test_two_processes_train_one_sd3_lora(tmp_path):
    files = save_tiny_sd3_files(tmp_path / "m", TinySD3Config(variant="5-medium"))
    data = two_process_dataset(tmp_path)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    out = tmp_path / "run" / "out"
    argv = train_args(files["sd3"], out, config=data, steps=2) + [
        "--tokenizer_cache_dir", str(files["tokenizer_cache_dir"]), "--t5xxl_max_token_length", "8",
        "--cache_latents", "--learning_rate", "1e-2"]
    saved, meta = run_two_processes(argv, str(driver), out)
    assert sorted(p.name for p in out.iterdir()) == ["lora.safetensors"]  # saved once, by the main process
    assert meta["ss_base_model_version"] == "5-medium" and meta["ss_network_module"] == "networks.lora_sd3"
    ranks = [load_file(str(tmp_path / "run" / f"rank{i}.safetensors")) for i in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() == saved.keys()
    for key in saved:  # gradients averaged across processes: both hold the same weights, the file has them
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.equal(saved[key], ranks[0][key]), key
    ups = [k for k in saved if k.endswith("lora_up.weight")]  # zero at the start
    assert any(saved[k].abs().sum() > 0 for k in ups if "_te1_" in k) and any(
        saved[k].abs().sum() > 0 for k in ups if k.startswith("lora_unet_joint_blocks_1_"))
