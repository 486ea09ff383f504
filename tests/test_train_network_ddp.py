"""Two real processes (accelerate launch --multi_gpu --num_processes 2; on CPU with gloo): data-parallel
training, saving from the main process only, and resume."""

from __future__ import annotations

import torch

from tests.train_helpers import dataset_toml, load_lora, make_images, run_script, train_args


def test_two_processes_train_save_and_resume(tiny_sd1_dir, tmp_path):
    data = dataset_toml(tmp_path / "data.toml", make_images(tmp_path / "images", count=4), batch_size=1)
    extra = ["--save_state", "--save_every_n_steps", "2", "--network_train_unet_only"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo --w 64 --h 64 --s 2 --d 1\nsks --w 64 --h 64 --s 2 --d 2\n", encoding="utf-8")
    first = run_script(train_args(tiny_sd1_dir, tmp_path / "a", config=data, steps=4,
                                  extra=extra + ["--sample_prompts", str(prompts), "--sample_every_n_steps", "2"]),
                       processes=2)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "a"
    assert sorted(p.name for p in out.iterdir()) == ["lora-state", "lora-step00000002-state",
                                                     "lora-step00000002.safetensors", "lora.safetensors", "sample"]
    # each process renders its share of the prompts: both prompts at step 2 and at the end
    parts = [p.name.split("_") for p in (out / "sample").iterdir()]  # lora_<step>_<prompt>_<time>_<seed>.png
    assert sorted((n[1], n[2]) for n in parts) == [("000002", "00"), ("000002", "01"), ("000004", "00"),
                                                   ("000004", "01")]
    state = out / "lora-step00000002-state"
    assert (state / "rng_0.pt").is_file() and (state / "rng_1.pt").is_file()
    # 4 images, 2 processes, batch 1 -> 2 batches per process per epoch: 2 epochs
    tensors, meta = load_lora(out / "lora.safetensors")
    assert meta["ss_num_epochs"] == "2" and meta["ss_steps"] == "4"

    second = run_script(train_args(tiny_sd1_dir, tmp_path / "b", config=data, steps=4,
                                   extra=extra + ["--resume", str(state)]), processes=2)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed, _ = load_lora(tmp_path / "b" / "lora.safetensors")
    for key in tensors:
        torch.testing.assert_close(resumed[key], tensors[key], rtol=1e-5, atol=1e-6)

    single = run_script(train_args(tiny_sd1_dir, tmp_path / "c", config=data, steps=1, extra=["--resume", str(state)]))
    assert single.returncode == 2 and "saved by 2 process(es)" in single.stderr
