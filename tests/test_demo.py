"""demo.py runs the whole product path (tiny model, images, TOML, training, samples, logs) quickly."""

from __future__ import annotations

import time

from tests.train_helpers import run_script


def test_demo_trains_samples_and_logs(tmp_path):
    out = tmp_path / "demo"
    start = time.monotonic()
    result = run_script(["--output_dir", str(out), "--steps", "20"], script="demo.py", timeout=240)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    lora = out / "lora" / "demo_lora.safetensors"
    assert lora.is_file()
    assert len(list((out / "lora" / "sample").glob("demo_lora_*.png"))) >= 2
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert str(lora) in result.stdout and "tensorboard --logdir" in result.stdout
    assert elapsed < 120
