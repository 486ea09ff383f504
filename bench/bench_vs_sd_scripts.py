"""train_network.py against sd-scripts' train_network.py, side by side: whole-process wall time and peak memory.

    python bench/bench_vs_sd_scripts.py --sd_scripts /path/to/sd-scripts --kohya_python /path/to/venv/bin/python \
        [--rounds 3] [--steps 60] [--json results.json]

The job (the issue-10 speed target): an SD1.x-layout UNet of 35.6 M parameters (block widths 64/128/256/256, two
layers per block, SD1.x block types, cross-attention width 384) with a 2-layer text encoder and the tiny VAE,
random weights saved as a diffusers folder; 256 px images, batch 2, LoRA rank 16 on the UNet, cached latents,
SDPA, fp32, AdamW, ``--steps`` optimizer steps, no data-loader workers. Both scripts get the same flags and
dataset config; sd-scripts runs through ``/work/shared/lab/kohya_launch.py`` (``--lab``), which adapts its
hard-coded SD1.5 widths to this model. Runs alternate (ours, theirs, ours, ...) so that the load of a shared
machine hits both alike; each is one process, timed from start to exit, with its peak RSS (``wait4``), the
1-minute load average when it ended, and the CUDA peak when there is a GPU. The medians are printed last.
Extra flags for our side only (``--ours_extra "--torch_compile"``) measure options.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.timing import write_images  # noqa: E402

MODEL = dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=384, text_layers=2,
             text_heads=6, text_intermediate=1536)


def build(work: Path, images: int) -> tuple[Path, Path, Path]:
    """The model folder, the dataset config and the tokenizer cache folder sd-scripts reads."""
    from library.models.tiny import TinyConfig, save_tiny_diffusers_model, write_clip_tokenizer

    model = save_tiny_diffusers_model(work / "model", TinyConfig(**MODEL))
    folder = work / "images"
    for start in range(0, images, 4):  # write_images makes 4 at a time
        part = write_images(work / f"part{start}", 256)
        for file in part.iterdir():
            folder.mkdir(exist_ok=True)
            stem, suffix = file.name.split(".", 1)
            file.rename(folder / f"{int(stem) + start}.{suffix}")
    toml = work / "data.toml"
    toml.write_text(f"[general]\nresolution = 256\nbatch_size = 2\ncaption_extension = '.caption'\n"
                    f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{folder.as_posix()}'\n", encoding="utf-8")
    tokenizers = work / "tokenizers"
    write_clip_tokenizer(tokenizers / "openai_clip-vit-large-patch14")
    return model, toml, tokenizers


def common_args(model: Path, toml: Path, out: Path, steps: int) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(toml), "--output_dir", str(out),
            "--output_name", "bench", "--network_module", "networks.lora", "--network_dim", "16",
            "--network_alpha", "16", "--network_train_unet_only", "--cache_latents", "--sdpa",
            "--mixed_precision", "no", "--learning_rate", "1e-4", "--optimizer_type", "AdamW",
            "--max_train_steps", str(steps), "--seed", "0", "--max_data_loader_n_workers", "0",
            "--save_model_as", "safetensors"]


def timed(cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> dict:
    """Run ``cmd`` as one process: wall seconds, CPU seconds (user + system: with one thread, the figure a
    shared machine's load disturbs least), peak RSS (MiB), the load average at its end, the exit status."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024,
            "load_avg_1m": os.getloadavg()[0],
            "returncode": proc.returncode, "log": str(log)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sd_scripts", type=Path, required=True, help="an sd-scripts work tree")
    parser.add_argument("--kohya_python", default=sys.executable, help="the Python of sd-scripts' venv")
    parser.add_argument("--lab", type=Path, default=Path("/work/shared/lab"),
                        help="folder with kohya_launch.py and shims/ (see its README)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--ours_extra", default="", help="extra flags for our run only")
    parser.add_argument("--only", choices=("ours", "theirs"), default=None, help="run one side only")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for both sides (OMP_NUM_THREADS; default 1, as the tests run)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_vs_") as tmp:
        work = Path(tmp)
        model, toml, tokenizers = build(work, args.images)
        threads = str(args.threads)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        theirs_env = {**env, "PYTHONPATH": str(args.lab / "shims"), "KOHYA_COMPAT_NEW_LIBS": "1",
                      "SD_SCRIPTS": str(args.sd_scripts), "SD_SCRIPT": "train_network.py"}
        sides = [s for s in ("ours", "theirs") if args.only in (None, s)]
        results: dict[str, list[dict]] = {s: [] for s in sides}
        for r in range(args.rounds):
            for side in sides:
                out = work / f"out_{side}_{r}"
                flags = common_args(model, toml, out, args.steps)
                if side == "ours":
                    cmd = [sys.executable, str(ROOT / "train_network.py"), *flags, *shlex.split(args.ours_extra)]
                    res = timed(cmd, cwd=ROOT, env=env, log=work / f"{side}_{r}.log")
                else:
                    cmd = [args.kohya_python, str(args.lab / "kohya_launch.py"), *flags,
                           "--tokenizer_cache_dir", str(tokenizers)]
                    res = timed(cmd, cwd=args.sd_scripts, env=theirs_env, log=work / f"{side}_{r}.log")
                if res["returncode"] != 0:
                    print(Path(res["log"]).read_text(encoding="utf-8")[-3000:], file=sys.stderr)
                    return 1
                results[side].append(res)
                print(f"round {r + 1} {side:6s}: {res['wall_s']:7.1f} s wall, {res['cpu_s']:7.1f} s CPU, "
                      f"peak {res['peak_rss_mib']:6.0f} MiB, load {res['load_avg_1m']:.2f}", flush=True)
        summary = {side: {"median_wall_s": statistics.median(x["wall_s"] for x in runs),
                          "median_cpu_s": statistics.median(x["cpu_s"] for x in runs),
                          "median_peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in runs),
                          "runs": runs} for side, runs in results.items()}
        if len(sides) == 2:
            ours, theirs = summary["ours"], summary["theirs"]
            summary["speedup"] = theirs["median_wall_s"] / ours["median_wall_s"]
            summary["cpu_speedup"] = theirs["median_cpu_s"] / ours["median_cpu_s"]
            summary["memory_ratio"] = ours["median_peak_rss_mib"] / theirs["median_peak_rss_mib"]
            print(f"median wall: ours {ours['median_wall_s']:.1f} s, sd-scripts {theirs['median_wall_s']:.1f} s "
                  f"-> {summary['speedup']:.2f}x its speed; median CPU: ours {ours['median_cpu_s']:.1f} s, "
                  f"sd-scripts {theirs['median_cpu_s']:.1f} s -> {summary['cpu_speedup']:.2f}x; "
                  f"peak RSS ours {ours['median_peak_rss_mib']:.0f} MiB, "
                  f"sd-scripts {theirs['median_peak_rss_mib']:.0f} MiB -> {summary['memory_ratio']:.2f}x its "
                  "memory", flush=True)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
