"""VLM LoRA training speed and peak memory (vlm_train.py's recipe: collate, forward, backward, optimizer step).

    python bench/bench_vlm.py [--steps 5] [--real_size] [--model_path FOLDER] [--json results.json]

Cases (random weights unless --model_path; every case in its own process so peaks do not mix):
  tiny-llava-ov   the test model of library.vlm.tiny (64 px image = 88 image tokens), batch 1 and 4
  tiny-qwen2.5-vl the test model (56 px image = 4 image tokens), batch 1 and 4
  llava-ov-0.5b   LLaVA-OneVision-0.5B's configuration (SigLIP-so400m 384 px + Qwen2-0.5B, 894 M parameters), one
                  384x384 image (1485 image tokens) and a short answer, batch 1, LoRA r=8 on every language-model
                  linear layer + the projector; on CUDA by default (bf16 weights, bf16 autocast), on CPU only with
                  --real_size (it needs about 12 GiB of RAM there). --model_path uses a real local checkpoint.
Seconds per optimizer step are the mean over ``--steps`` steps after 2 warm-up steps; peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the process's peak RSS on CPU. ``BENCH_THREADS=N`` sets the CPU
threads (default: torch's default).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAVA_OV_05B = {  # llava-hf/llava-onevision-qwen2-0.5b-ov-hf config.json (sizes)
    "vision_config": dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, patch_size=14,
                          image_size=384, num_hidden_layers=26, num_attention_heads=16, vision_use_head=False),
    "text_config": dict(model_type="qwen2", vocab_size=152000, hidden_size=896, intermediate_size=4864,
                        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                        max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True),
    "vision_feature_select_strategy": "full", "vision_feature_layer": -1, "vision_aspect_ratio": "anyres_max_9",
}


def _llava_ov_05b(device, dtype):
    """The 0.5B model with random weights, built on ``device`` in ``dtype``, and the tiny tokenizer."""
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    from library.vlm.tiny import build_tokenizer

    tokenizer, ids = build_tokenizer()
    processor = LlavaOnevisionImageProcessorPil()  # 384 px tiles, the checkpoint's grid pinpoints
    config = LlavaOnevisionConfig(**LLAVA_OV_05B, image_token_index=ids["<image>"], video_token_index=ids["<video>"],
                                  image_grid_pinpoints=processor.image_grid_pinpoints, tie_word_embeddings=True)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    return model, tokenizer, processor


def _load(case: str, model_path: str | None, device, dtype):
    from library.vlm.families import family_for
    from library.vlm.loading import VLM, load_vlm
    from library.vlm.tiny import build_llava_onevision, build_qwen2_5_vl, build_tokenizer, image_processor

    if model_path:
        return load_vlm(Path(model_path), dtype=dtype, device=device)
    if case == "llava-ov-0.5b":
        model, tokenizer, processor = _llava_ov_05b(device, dtype)
    else:
        family = "llava_onevision" if case == "tiny-llava-ov" else "qwen2_5_vl"
        tokenizer, ids = build_tokenizer()
        builder = build_llava_onevision if family == "llava_onevision" else build_qwen2_5_vl
        model = builder(ids, len(tokenizer)).to(device, dtype)
        processor = image_processor(family)
    return VLM(model, tokenizer, processor, family_for(model.config, processor), Path("."))


def one_case(case: str, batch_size: int, steps: int, work: Path, model_path: str | None, checkpointing: bool) -> dict:
    import torch
    from PIL import Image

    from library.vlm.adapters import TrainingTargets, apply_targets
    from library.vlm.data import Sample, Turn
    from library.vlm.encoding import ConversationEncoder, collate, model_inputs

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    vlm = _load(case, model_path, device, dtype)
    model = apply_targets(vlm.model, vlm.family, TrainingTargets(), gradient_checkpointing=checkpointing)
    model.train()
    size = 384 if "0.5b" in case or model_path else 64
    image_file = work / f"image_{size}.png"
    Image.new("RGB", (size, size), (200, 40, 40)).save(image_file)
    sample = Sample([image_file], [Turn("user", "<image>\nWhat is in the picture?"),
                                   Turn("assistant", "a red square on a plain background")], None, "bench")
    encoded = ConversationEncoder(vlm.family, vlm.tokenizer).encode(sample)
    batch = collate(vlm.family, [encoded] * batch_size, vlm.tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for step in range(steps + 2):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        inputs = model_inputs(batch, device, dtype)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
        if step == 1 and cuda:
            torch.cuda.reset_peak_memory_stats()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": case, "device": device.type, "batch_size": batch_size, "tokens": len(encoded),
            "image_tokens": encoded.image_tokens, "parameters": sum(p.numel() for p in model.parameters()),
            "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "gradient_checkpointing": checkpointing, "seconds_per_step": sum(times) / len(times),
            "peak_memory_mib": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--real_size", action="store_true", help="also the 0.5B case on CPU (about 12 GiB of RAM)")
    parser.add_argument("--model_path", default=None, help="a local LLaVA-OneVision folder for the 0.5B case")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)  # case batch (child process)
    args = parser.parse_args()
    if os.environ.get("BENCH_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    work = Path(os.environ.get("BENCH_WORK", "/tmp")) / "bench_vlm"
    work.mkdir(parents=True, exist_ok=True)
    if args.one:
        result = one_case(args.one[0], int(args.one[1]), args.steps, work, args.model_path,
                          args.gradient_checkpointing)
        print("RESULT " + json.dumps(result), flush=True)
        return
    import torch

    cases = [("tiny-llava-ov", 1), ("tiny-llava-ov", 4), ("tiny-qwen2.5-vl", 1), ("tiny-qwen2.5-vl", 4)]
    if torch.cuda.is_available() or args.real_size or args.model_path:
        cases.append(("llava-ov-0.5b", 1))
    results = []
    for case, batch in cases:
        command = [sys.executable, __file__, "--one", case, str(batch), "--steps", str(args.steps)]
        command += (["--model_path", args.model_path] if args.model_path and "0.5b" in case else [])
        command += ["--gradient_checkpointing"] if args.gradient_checkpointing else []
        out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(f"{case} batch {batch}: failed\n{out.stderr[-2000:]}")
            continue
        result = json.loads(lines[-1][7:])
        results.append(result)
        print(f"{case:16s} batch {batch}  {result['device']}  {result['tokens']:5d} tokens "
              f"({result['image_tokens']} image)  {result['seconds_per_step']:.4f} s/step  "
              f"peak {result['peak_memory_mib']:.0f} MiB  trained {result['trained_parameters']:,} of "
              f"{result['parameters']:,}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
