"""A complete LoRA training in under a minute on a CPU: tiny model, generated images, real pipeline.

    python demo.py [--output_dir demo_output] [--steps 40]

Creates a tiny random-weight SD1.x model and a small captioned image set under the output folder, writes a
dataset TOML and a sample-prompt file, trains a LoRA with train_network.py's main (samples every 20 steps,
TensorBoard logs), and prints where everything is.
"""

from __future__ import annotations

import sys
from pathlib import Path

from library.cli import ArgumentParser
from library.errors import run_cli

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def make_images(folder: Path) -> list[Path]:
    """One 64x64 picture per color: a colored disc on a gradient, with a caption file beside it."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, rgb) in enumerate(COLORS.items()):
        ramp = np.linspace(40, 200, 64, dtype=np.uint8)
        background = np.stack([np.tile(ramp, (64, 1))] * 3, axis=-1)
        image = Image.fromarray(background, "RGB")
        ImageDraw.Draw(image).ellipse((12 + i * 3, 12, 52 - i * 3, 52), fill=rgb)
        path = folder / f"{name}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(f"sks, a {name} circle", encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="demo.py", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="demo_output", help="folder for everything (default demo_output)")
    parser.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    options = parser.parse_args(argv)

    import torch

    from library.models.tiny import save_tiny_diffusers_model

    # the tiny model's operations are too small to gain from several threads; one avoids thread contention
    torch.set_num_threads(1)

    root = Path(options.output_dir).resolve()
    model_dir = root / "tiny_model"
    if not (model_dir / "model_index.json").is_file():
        save_tiny_diffusers_model(model_dir)
    images = root / "images"
    make_images(images)
    toml = root / "dataset.toml"
    toml.write_text(
        "[general]\nresolution = 64\ncaption_extension = \".txt\"\nbatch_size = 2\n\n"
        f"[[datasets]]\n\n  [[datasets.subsets]]\n  image_dir = '{images.as_posix()}'\n  num_repeats = 2\n",
        encoding="utf-8",
    )
    prompts = root / "prompts.txt"
    prompts.write_text("sks, a red circle --w 64 --h 64 --s 8 --d 1\n", encoding="utf-8")
    out = root / "lora"

    import train_network

    final = train_network.main([
        "--pretrained_model_name_or_path", str(model_dir), "--dataset_config", str(toml),
        "--output_dir", str(out), "--output_name", "demo_lora", "--overwrite",
        "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3",
        "--max_train_steps", str(options.steps), "--seed", "0", "--max_data_loader_n_workers", "0",
        "--cache_latents", "--sample_prompts", str(prompts), "--sample_every_n_steps", "20", "--sample_at_first",
        "--logging_dir", str(root / "logs"), "--save_every_n_steps", "20",
    ])
    samples = sorted((out / "sample").glob("*.png"))
    print("\nDemo finished.")
    print(f"  LoRA:        {final}")
    print(f"  samples:     {out / 'sample'} ({len(samples)} images)")
    print(f"  TensorBoard: tensorboard --logdir {root / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    run_cli(main)
