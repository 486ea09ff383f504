"""LoRA training step time and peak memory of the captioner recipe (train_blip_network.py,
train_florence_lora.py): the recipe's ``batch_loss``, backward and an AdamW step, as the loop runs them.

    python bench/bench_captioners.py [--cases tiny_blip,tiny_florence2,blip_base,florence2_base] [--steps 3]
    python bench/bench_captioners.py --cases blip_base --model_id /models/blip-image-captioning-base

Models: ``tiny_*`` are the test fixtures; ``blip_base`` / ``florence2_base`` are the real architectures
(BLIP-base: ViT-B/16 at 384 px + BERT-base decoder, 224 M parameters; Florence-2-base: DaViT + BART-base,
231 M) built from their configs with random weights and a synthetic vocabulary of the real size, unless
``--model_id`` names a real model folder. LoRA rank 16 on the default targets, batch 2, captions of ~20
tokens. Florence-2 images are 768 px on CUDA (577 image tokens) and 384 px on CPU (145 tokens, to stay
within a few GiB). Seconds per step are the mean over ``--steps`` steps after one warm-up step; peak memory
is ``torch.cuda.max_memory_allocated`` on CUDA (bf16 autocast there) and the process's peak RSS on CPU.
Each case runs in its own process. ``BENCH_THREADS=N`` sets the CPU threads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("tiny_blip", "tiny_florence2", "blip_base", "florence2_base")


def _base_blip() -> tuple:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(30524 - len(specials))])}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    config = BlipConfig(text_config=dict(vocab_size=len(vocab), bos_token_id=vocab["[DEC]"], pad_token_id=0,
                                         sep_token_id=vocab["[SEP]"], eos_token_id=vocab["[SEP]"]),
                        vision_config=dict(image_size=384, patch_size=16))
    return BlipForConditionalGeneration(config), tokenizer, BlipImageProcessorPil(size={"height": 384, "width": 384})


def _base_florence2(resolution: int) -> tuple:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (BartConfig, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor,
                              PreTrainedTokenizerFast)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>", *"describe in detail what is shown the image .".split()]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(51289 - len(words))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1),
                                                                                                 ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>",
                                        extra_special_tokens={"image_token": "<image>"})
    text = BartConfig(vocab_size=len(vocab), d_model=768, encoder_layers=6, decoder_layers=6,
                      encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                      decoder_ffn_dim=3072, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, decoder_start_token_id=2)
    vision = dict(embed_dim=[128, 256, 512, 1024], depths=[1, 1, 9, 1], num_heads=[4, 8, 16, 32],
                  num_groups=[4, 8, 16, 32], window_size=12, projection_dim=768)
    config = Florence2Config(text_config=text.to_dict(), vision_config=vision, image_token_id=vocab["<image>"])
    image_processor = CLIPImageProcessorPil(size={"height": resolution, "width": resolution}, do_center_crop=False)
    image_processor.image_seq_length = (resolution // 32) ** 2 + 1
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    return Florence2ForConditionalGeneration(config), tokenizer, image_processor, processor


def _captioner(case: str, model_id: str | None, work: Path, resolution: int):
    from library.captioners.families import BLIP, FLORENCE2, Captioner, load_captioner
    from tests.captioner_helpers import build_tiny_blip, build_tiny_florence2

    family = BLIP if "blip" in case else FLORENCE2
    task = "<DETAILED_CAPTION>"
    if model_id:
        return load_captioner(family, model_id, task=task)
    if case.startswith("tiny"):
        build = build_tiny_blip if family is BLIP else build_tiny_florence2
        return load_captioner(family, str(build(work / case)), task=task)
    if family is BLIP:
        model, tokenizer, image_processor = _base_blip()
        return Captioner(family, model, tokenizer, image_processor, None, task)
    model, tokenizer, image_processor, processor = _base_florence2(resolution)
    return Captioner(family, model, tokenizer, image_processor, processor, task)


def one_case(case: str, steps: int, model_id: str | None, work: Path) -> dict:
    import torch
    from accelerate import Accelerator
    from PIL import Image

    from library.captioners.recipe import CaptionerLoRARecipe, LoraSettings, SampleSettings

    cuda = torch.cuda.is_available()
    resolution = 64 if case.startswith("tiny") else 768 if cuda else 384
    torch.manual_seed(0)
    captioner = _captioner(case, model_id, work, resolution)
    recipe = CaptionerLoRARecipe(captioner, LoraSettings(16, 32, 0.05, captioner.family.default_targets),
                                 SampleSettings())
    recipe.setup(gradient_checkpointing=False, quantized=False)
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    recipe.model.to(accelerator.device).train()
    vocab = [w for w in captioner.tokenizer.get_vocab() if w.isalnum() and len(w) > 1][:500]
    texts = [" ".join(vocab[(i * 7 + j) % len(vocab)] for j in range(20)) for i in range(2)]
    images = [Image.new("RGB", (resolution, resolution), (40 * i, 90, 160)) for i in range(2)]
    batch = captioner.training_inputs(images, captioner.tokenize_captions(texts))
    optimizer = torch.optim.AdamW(recipe.trainable_parameters(), lr=1e-4)
    run = SimpleNamespace(accelerator=accelerator)

    def step() -> None:
        recipe.batch_loss(run, batch, 0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": case, "device": "cuda" if cuda else "cpu", "resolution": resolution,
            "parameters": sum(p.numel() for p in recipe.model.parameters()),
            "trained": sum(p.numel() for p in recipe.trainable_parameters()), "s_per_step": round(seconds, 4),
            "peak_memory_gib": round(peak / 2**30, 2), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model_id", default=None, help="a real model folder (one family's cases only)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # run one case in this process
    args = parser.parse_args()
    if os.environ.get("BENCH_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    if args.one:
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(one_case(args.one, args.steps, args.model_id, Path(work))))
        return
    results = []
    for case in args.cases.split(","):
        command = [sys.executable, __file__, "--one", case, "--steps", str(args.steps)]
        if args.model_id:
            command += ["--model_id", args.model_id]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{case}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
