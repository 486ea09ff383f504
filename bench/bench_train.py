"""Training speed and peak memory of train_network.py's and sdxl_train_network.py's loop.

    python bench/bench_train.py [--steps 6] [--models tiny sd15 sdxl_tiny] [--json results.json]
    python bench/bench_train.py --models sdxl --steps 1     # real-size SDXL: needs ~20 GB of RAM on CPU

Models (random weights, saved as diffusers folders first):
  tiny   library.models.tiny defaults (UNet 32/32/64/64 channels, 1.6 M parameters)
  sd15   SD1.5's UNet widths (320/640/1280/1280), 8 heads, cross-attention dim 768, SD1.5 block types, but one
         layer per block instead of two; a 2-layer CLIP-L-width text encoder; the tiny VAE (latents are cached)
  sdxl_tiny  library.models.tiny_sdxl (the SDXL structure: text_time UNet, two text encoders)
  sdxl   the real SDXL base 1.0 architecture (2.6 B UNet parameters) with random weights, written as one fp16
         single file in the sd_xl_base_1.0 layout and loaded from it as users do (not in the default set)
each at two resolutions (CPU: 64/128 and 128/256 px, SDXL 128 px; CUDA: 256/512 and 512/768 px, SDXL 1024 px),
batch size 1, LoRA rank 16
on the UNet (text encoder frozen, its outputs cached). Seconds per optimizer step are measured over
``--steps`` steps after 2 warm-up steps; peak memory is the process's peak RSS on CPU, and
``torch.cuda.max_memory_allocated`` on CUDA (with ``--mixed_precision bf16`` there). Each case runs in its
own process so peaks do not mix. ``BENCH_THREADS=N`` sets the CPU threads (default: torch's default).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cases import bench_main, bench_parser, bench_threads  # noqa: E402
from bench.timing import prepare_run, timed_training, write_dataset_toml  # noqa: E402

CASES = {
    "tiny": dict(block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, text_layers=2, text_heads=4,
                 text_intermediate=64),
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, text_layers=2, text_heads=12,
                 text_intermediate=3072),
}
SDXL_CASES = ("sdxl_tiny", "sdxl")
DEFAULT_MODELS = ["tiny", "sd15", "sdxl_tiny"]
RESOLUTIONS = {"cpu": {"tiny": (64, 128), "sd15": (128, 256), "sdxl_tiny": (64, 128), "sdxl": (128,)},
               "cuda": {"tiny": (256, 512), "sd15": (512, 768), "sdxl_tiny": (256, 512), "sdxl": (1024,)}}


def build_model(name: str, work: Path) -> None:
    """Write the case's model to ``work`` (SDXL real size: built in float16, one module at a time)."""
    if name == "sdxl":
        import torch

        from library.models.tiny_sdxl import save_sdxl_base_random_single_file

        torch.manual_seed(0)
        save_sdxl_base_random_single_file(work / "model_sdxl.safetensors")
    elif name == "sdxl_tiny":
        from library.models.tiny_sdxl import save_tiny_sdxl_diffusers_model

        save_tiny_sdxl_diffusers_model(work / "model_sdxl_tiny")
    else:
        from library.models.tiny import TinyConfig, save_tiny_diffusers_model

        save_tiny_diffusers_model(work / f"model_{name}", TinyConfig(**CASES[name]))


def _prepare(argv: list[str], sdxl: bool):
    import torch

    import sdxl_train_network
    import train_network
    from library.config.arguments import SUPPORT_TRAIN_NETWORK
    from library.training.recipes import LoRARecipe

    torch.set_num_threads(1)
    return prepare_run(sdxl_train_network if sdxl else train_network, LoRARecipe, SUPPORT_TRAIN_NETWORK,
                       ("sdxl",) if sdxl else ("sd",), argv)


def one_case(name: str, resolution: int, steps: int, work: Path) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    sdxl = name in SDXL_CASES
    model = work / ("model_sdxl.safetensors" if name == "sdxl" else f"model_{name}")
    toml = write_dataset_toml(work, resolution)
    out = work / f"out_{name}_{resolution}"
    argv = ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(toml), "--output_dir", str(out),
            "--overwrite", "--network_dim", "16", "--network_train_unet_only", "--cache_latents",
            "--learning_rate", "1e-4", "--max_train_steps", "2", "--seed", "0", "--max_data_loader_n_workers", "0",
            "--mixed_precision", "bf16" if cuda else "no"]
    if sdxl:
        argv += ["--cache_text_encoder_outputs", "--gradient_checkpointing"]
    threads = bench_threads()
    start_load = time.perf_counter()
    run = _prepare(argv, sdxl)  # (sets one thread, as the tests use)
    load_seconds = time.perf_counter() - start_load
    torch.set_num_threads(threads)
    unet_params = sum(p.numel() for p in run.models.unet.parameters())
    return {"model": name, "resolution": resolution, "unet_parameters": unet_params,
            "prepare_seconds": load_seconds, **timed_training(run, steps)}


def _line(result: dict, device: str) -> str:
    return (f"{result['model']:9s} {result['resolution']:4d}px {device}: {result['seconds_per_step']:.3f} s/step, peak "
            f"{result['peak_memory_mib']:.0f} MiB ({result['memory_kind']}), UNet "
            f"{result['unet_parameters'] / 1e6:.1f} M params, {result['threads']} thread(s)")


def main() -> int:
    parser = bench_parser(__doc__, [*CASES, *SDXL_CASES], DEFAULT_MODELS, ("MODEL", "RESOLUTION", "WORKDIR"))
    return bench_main(parser, __file__, "bench_train_", build=build_model, one_case=one_case, line=_line,
                      cases=lambda args, device, name: [(str(resolution),) for resolution in RESOLUTIONS[device][name]],
                      keep_going=False)


if __name__ == "__main__":
    sys.exit(main())
