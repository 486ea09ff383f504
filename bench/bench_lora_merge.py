"""Time and peak memory of ``networks/merge_lora.py`` merging a LoRA into a full-size random checkpoint.

    python bench/bench_lora_merge.py [--models sd15 sd2 sdxl] [--rank 32] [--conv_rank 16] [--precision float]
        [--json results.json]

Models (random weights, fp16 single files in the original LDM layout, written first):
  sd15  SD1.5's full architecture: UNet 320/640/1280/1280, 2 layers per block, CLIP ViT-L text encoder (12 layers),
        the SD VAE (about 1.07 G parameters, 2.1 GB in fp16)
  sd2   SD2.1's full architecture (linear projections, 1024-wide OpenCLIP text encoder, 23 layers)
  sdxl  SDXL base 1.0's full architecture in the ``sd_xl_base_1.0`` layout (UNet 2.57 G, both text encoders, VAE:
        3.47 G parameters, 6.9 GB in fp16), written by ``library.models.tiny_sdxl.save_sdxl_base_random_single_file``
  sd3   SD3 Medium's MMDiT (24 joint blocks, hidden 1536: 2.03 G parameters, 4.1 GB in fp16) as the SAI single file
        without text encoders or VAE (``model.diffusion_model.*``), written one tensor at a time; its LoRA is
        sd-scripts' ``networks.lora_sd3`` (every joint-block layer, fused qkv) at ``--rank``
The LoRA covers every module sd-scripts targets (text encoders and UNet, plus LoCon 3x3 convs) at ``--rank``
(``--conv_rank``). The merge runs as the user would run it, in its own process: ``--precision`` (default float,
sd-scripts' default; ``fp16`` holds the model in fp16 and still adds each delta in float32: for an fp16 checkpoint
saved in fp16 the result is the same, bit for bit), ``--save_precision fp16``, ``--device cuda`` when CUDA is
available. Reported: wall time of the whole command (load, merge, save) and the merge process's peak RSS (plus
peak CUDA memory on CUDA). Check ``free -g`` first: the fp32 model alone is twice the fp16 file (SDXL in float
needs about 21 GiB; in fp16 about half).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
CASES = ("sd15", "sd2", "sdxl", "sd3")


def _random_fp16(build):
    """A module built on the meta device, then filled with small random fp16 values (no fp32 copy in memory)."""
    import torch

    with torch.device("meta"):
        module = build()
    module = torch.nn.Module.to(module, dtype=torch.float16).to_empty(device="cpu")  # (diffusers' .to warns)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(torch.float16))
        for b in module.buffers():
            b.zero_()
    return module


def build_checkpoint(name: str, path: Path) -> int:
    """Write the random checkpoint; returns its parameter count."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if name == "sd3":
        return _write_sd3_mmdit(path)
    if name == "sdxl":
        from safetensors import safe_open

        from library.models.tiny_sdxl import save_sdxl_base_random_single_file

        save_sdxl_base_random_single_file(path)
        with safe_open(str(path), "pt") as f:
            return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())

    from library.lora_tools.references import SD_REFERENCE_CONFIGS
    from library.models.families import sd_family
    from library.models.loading import SDModels
    from library.models.saving import save_sd_model

    config = SD_REFERENCE_CONFIGS["sd1" if name == "sd15" else "sd2"]
    unet = _random_fp16(lambda: UNet2DConditionModel(**config["unet"]))
    text_encoder = _random_fp16(lambda: CLIPTextModel(CLIPTextConfig(**config["text"])))
    vae = _random_fp16(lambda: AutoencoderKL(**VAE))
    models = SDModels(sd_family(name == "sd2"), unet, vae, [text_encoder], [None], source="random")
    save_sd_model(path, models, fmt="safetensors")
    return sum(p.numel() for m in (unet, text_encoder, vae) for p in m.parameters())


def _sd3_meta_transformer():
    import torch
    from diffusers import SD3Transformer2DModel

    from library.models.sd3.tiny import full_size_architecture

    with torch.device("meta"):
        return SD3Transformer2DModel(**full_size_architecture("medium").diffusers_config())


def _write_sd3_mmdit(path: Path) -> int:
    """SD3 Medium's MMDiT in the SAI layout with random fp16 values, one tensor at a time (no model in memory)."""
    import torch

    from library.models.safetensors_stream import save_safetensors_streaming
    from library.models.sd3.conversion import SAI_PREFIX, diffusers_to_sai
    from library.models.sd3.tiny import full_size_architecture

    meta = diffusers_to_sai(_sd3_meta_transformer().state_dict(), full_size_architecture("medium"), prefix=SAI_PREFIX)
    gen = torch.Generator().manual_seed(0)
    shapes = {k: (v.shape, torch.float16) for k, v in meta.items()}
    producers = {k: (lambda k=k: torch.randn(meta[k].shape, generator=gen).mul_(0.02).half()) for k in meta}
    save_safetensors_streaming(path, producers, shapes)
    return sum(v.numel() for v in meta.values())


def _sd3_lora(path: Path, rank: int) -> int:
    import torch

    from networks import lora_sd3

    network = lora_sd3.create_network(1.0, rank, float(rank), None, None, _sd3_meta_transformer())
    gen = torch.Generator().manual_seed(1)
    state = {k: (torch.randn(v.shape, generator=gen) * 0.01).half() if k.endswith("weight") else v.half()
             for k, v in network.state_dict().items()}
    from safetensors.torch import save_file

    save_file(state, str(path), {"ss_network_module": "networks.lora_sd3"})
    return len(network.all_loras())


def _numel(shape) -> int:
    count = 1
    for n in shape:
        count *= int(n)
    return count


def build_lora(name: str, path: Path, rank: int, conv_rank: int) -> int:
    """A random LoRA (LoCon) over every target of the full-size model; returns its module count."""
    from types import SimpleNamespace

    import torch

    from library.lora_tools import references
    from library.lora_tools.lora_file import LoRAModuleWeights, write_lora
    from library.lora_tools.targets import fused_shape
    from library.models.families import family_spec

    if name == "sd3":
        return _sd3_lora(path, rank)
    if name == "sdxl":
        text_encoders, unet = references.sdxl_reference()
    else:
        text_encoders, unet = references.sd_reference("sd1" if name == "sd15" else "sd2")
    spec = family_spec("sdxl" if name == "sdxl" else "sd")
    targets = spec.lora_targets(SimpleNamespace(text_encoders=text_encoders, denoiser=unet), conv_blocks=True)
    gen = torch.Generator().manual_seed(1)
    modules = {}
    for lora_name, parts in targets.items():
        shape = fused_shape(parts)
        is_3x3 = len(shape) == 4 and shape[2:] != (1, 1)
        r = conv_rank if is_3x3 else rank
        down = torch.randn(r, *shape[1:], generator=gen) * 0.01
        up = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=gen) * 0.01
        modules[lora_name] = LoRAModuleWeights(down, up, float(r))
    write_lora(path, modules, {"ss_network_module": "networks.lora"}, torch.float16)
    return len(modules)


def merge_case(name: str, work: Path, precision: str) -> dict:
    """Run merge_lora.py's main in this process and measure it (own process: the peak RSS is the merge's)."""
    import torch

    from networks import merge_lora

    cuda = torch.cuda.is_available()
    ckpt, lora = work / f"{name}.safetensors", work / f"{name}_lora.safetensors"
    argv = ["--sd_model", str(ckpt), "--models", str(lora), "--save_to", str(work / f"{name}_merged.safetensors"),
            "--precision", precision, "--save_precision", "fp16", "--overwrite"] + (["--device", "cuda"] if cuda else [])
    start = time.perf_counter()
    merge_lora.main(argv)
    seconds = time.perf_counter() - start
    result = {"model": name, "device": "cuda" if cuda else "cpu", "precision": precision, "seconds": seconds,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "checkpoint_gib": ckpt.stat().st_size / 2**30, "lora_mib": lora.stat().st_size / 2**20}
    if cuda:
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def run_case(name: str, rank: int, conv_rank: int, work: Path, precision: str) -> dict:
    subprocess.run([sys.executable, __file__, "--build", name, str(work), str(rank), str(conv_rank)], check=True,
                   cwd=ROOT)
    proc = subprocess.run([sys.executable, __file__, "--merge", name, str(work), precision], cwd=ROOT,
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(proc.stderr[-3000:])
    phases = [ln for ln in proc.stdout.splitlines() if ln.startswith("saved ")]  # merge_lora.py's own timings
    return {**json.loads(lines[-1][len("RESULT "):]), "rank": rank, "conv_rank": conv_rank,
            "merge_lora_output": phases[-1] if phases else ""}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["sd15"], choices=CASES)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--conv_rank", type=int, default=16)
    parser.add_argument("--precision", choices=("float", "fp16", "bf16"), default="float",
                        help="merge_lora.py --precision (the dtype the model is held in)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--build", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--merge", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.merge:
        print("RESULT " + json.dumps(merge_case(args.merge[0], Path(args.merge[1]), args.merge[2])), flush=True)
        return 0
    if args.build:
        name, work, rank, conv_rank = args.build
        params = build_checkpoint(name, Path(work) / f"{name}.safetensors")
        count = build_lora(name, Path(work) / f"{name}_lora.safetensors", int(rank), int(conv_rank))
        print(f"built {name}: {params / 1e9:.2f} G parameters, LoRA with {count} modules", flush=True)
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_lora_merge_") as work:
        for name in args.models:
            result = run_case(name, args.rank, args.conv_rank, Path(work), args.precision)
            results.append(result)
            print(f"{name}: merge into a {result['checkpoint_gib']:.2f} GiB checkpoint ({result['device']}, "
                  f"--precision {args.precision}, "
                  f"LoRA {result['lora_mib']:.0f} MiB, rank {args.rank}/conv {args.conv_rank}): "
                  f"{result['seconds']:.1f} s, peak RSS {result['peak_rss_gib']:.2f} GiB"
                  + (f", peak CUDA {result['peak_cuda_gib']:.2f} GiB" if "peak_cuda_gib" in result else "")
                  + f"\n  {result['merge_lora_output']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
