"""Inference with a (fine-tuned) VLM: answers generated for a JSON / JSONL set or for a folder of images with one
prompt, and the stage-2 head's outputs when the adapter folder has a head. Prompts are built from the turns before
the final answer (the gold label is never part of the prompt); results go to one JSON file with accuracy when
labels exist."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from library.cli import ArgumentParser
from library.errors import UserError
from library.vlm.data import IMAGE_PLACEHOLDER, DataOptions, Sample, Turn, load_conversations
from library.vlm.encoding import ConversationEncoder, collate, model_inputs
from library.vlm.families import END_OF_TURN
from library.vlm.head import TaskHead, load_head, pool
from library.vlm.loading import VLM, apply_adapter, load_vlm, resolve_base_and_adapter
from library.vlm.recipe import compute_dtype

DEFAULT_PROMPT = "Describe this image."


@dataclass
class Predictor:
    vlm: VLM
    encoder: ConversationEncoder
    head: TaskHead | None
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.vlm.model)

    def stop_ids(self) -> list[int]:
        ids = {self.vlm.tokenizer.convert_tokens_to_ids(END_OF_TURN)}
        if self.vlm.tokenizer.eos_token_id is not None:
            ids.add(self.vlm.tokenizer.eos_token_id)
        return sorted(ids)

    def prompt_batch(self, samples: Sequence[Sample], images: Sequence[Any] | None = None) -> dict[str, Any]:
        """Left-padded prompts (without the gold answers) ending with the assistant prefix; ``images`` (PIL, in
        order) instead of reading the samples' image files."""
        if images is None:
            items = [self.encoder.encode(s, for_generation=True) for s in samples]
        else:
            sizes = iter([im.size for im in images])
            items = [self.encoder.encode(s, for_generation=True, sizes=[next(sizes) for _ in s.images])
                     for s in samples]
        return collate(self.vlm.family, items, self.vlm.tokenizer.pad_token_id, padding_side="left", images=images)

    @torch.no_grad()
    def generate(self, samples: Sequence[Sample], *, images: Sequence[Any] | None = None, max_new_tokens: int = 64,
                 num_beams: int = 1, do_sample: bool = False, temperature: float = 1.0) -> list[str]:
        from transformers import GenerationConfig

        batch = self.prompt_batch(samples, images)
        inputs = model_inputs(batch, self.device, self.dtype, with_labels=False)
        config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample,
                                  temperature=temperature if do_sample else None, eos_token_id=self.stop_ids(),
                                  pad_token_id=self.vlm.tokenizer.pad_token_id)
        output = self.vlm.model.generate(**inputs, generation_config=config)
        new = output[:, inputs["input_ids"].shape[1]:]
        texts = self.vlm.tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return [t.strip() for t in texts]

    @torch.no_grad()
    def head_outputs(self, samples: Sequence[Sample]) -> list[float]:
        """The head's probability of "yes" (binary) or its value (regression)."""
        assert self.head is not None
        batch = self.prompt_batch(samples)
        inputs = model_inputs(batch, self.device, self.dtype, with_labels=False)
        hidden = self.vlm.model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        pooled = pool(hidden, batch["attention_mask"], batch["last_index"], self.head.config.pooling)
        out = self.head.linear(pooled.float()).squeeze(-1)
        if self.head.config.head_type == "binary":
            out = out.sigmoid()
        return [float(v) for v in out]


def load_predictor(base: str | None, adapter: str | None, device: torch.device, dtype: torch.dtype | None = None,
                   ) -> Predictor:
    """Base model (+ adapter and head) ready for inference."""
    folder, adapter_path = resolve_base_and_adapter(base, adapter)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vlm = load_vlm(folder, dtype=dtype, device=device, flag="--base_model")
    if adapter_path is not None and (adapter_path / "adapter_config.json").is_file():
        apply_adapter(vlm, adapter_path)
    head = load_head(adapter_path, vlm.model) if adapter_path is not None else None
    return Predictor(vlm, ConversationEncoder(vlm.family, vlm.tokenizer), head, device)


def normalize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def is_correct(prediction: str, label: str) -> bool:
    """Exact match after lower-casing and dropping punctuation; a yes/no label matches an answer that starts with
    it ("Yes, it is red.")."""
    pred, gold = normalize(prediction), normalize(label)
    if gold in ("yes", "no"):
        return pred.split(" ")[0] == gold if pred else False
    return pred == gold


def folder_samples(folder: Path, prompt: str, recursive: bool) -> list[Sample]:
    from library.tools.image_batches import find_images

    question = prompt if IMAGE_PLACEHOLDER in prompt else f"{IMAGE_PLACEHOLDER}\n{prompt}"
    if question.count(IMAGE_PLACEHOLDER) != 1:
        raise UserError(f"--prompt may hold at most one {IMAGE_PLACEHOLDER} (each image is asked on its own)")
    return [Sample([p], [Turn("user", question)], None, str(p.relative_to(folder)))
            for p in find_images(folder, recursive)]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="vlm_infer.py", description="Answer questions about images with a (fine-tuned) VLM")
    p.add_argument("--base_model", type=str, default=None,
                   help="base model folder or id (default: the base model recorded in --lora_path)")
    p.add_argument("--lora_path", type=str, default=None, help="adapter folder of vlm_train.py / vlm_train_add_head.py")
    p.add_argument("--data_path", type=str, default=None, help="JSON / JSONL set (the last answer is the label)")
    p.add_argument("--image_folder", type=str, default=None, help="folder the data's image paths are relative to")
    p.add_argument("--images", type=str, default=None, help="a folder of images to ask --prompt about")
    p.add_argument("--prompt", type=str, default=DEFAULT_PROMPT, help="question for --images")
    p.add_argument("--recursive", action="store_true", help="with --images: also sub-folders")
    p.add_argument("--user_key", type=str, default="human")
    p.add_argument("--assistant_key", type=str, default="gpt")
    p.add_argument("--output_file", type=str, required=True, help="results JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_file")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--do_sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_generate", action="store_true", help="only the head's outputs (needs a head)")
    return p


def read_inputs(args: argparse.Namespace) -> list[Sample]:
    if bool(args.data_path) == bool(args.images):
        raise UserError("give --data_path (a JSON / JSONL set) or --images (a folder) with --prompt, one of them")
    if args.images:
        return folder_samples(Path(args.images), args.prompt, args.recursive)
    options = DataOptions(Path(args.image_folder) if args.image_folder else None, args.user_key, args.assistant_key,
                          require_answer=False)
    return load_conversations(args.data_path, options)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from library.io_utils import atomic_write_json
    from library.tools.image_batches import default_device

    for name in ("batch_size", "max_new_tokens", "num_beams"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1 (got {getattr(args, name)})")
    output = Path(args.output_file)
    if output.exists() and not args.overwrite:
        raise UserError(f"--output_file {output} exists; pass --overwrite to replace it")
    samples = read_inputs(args)
    predictor = load_predictor(args.base_model, args.lora_path, default_device())
    if args.no_generate and predictor.head is None:
        raise UserError("--no_generate needs a head in --lora_path (vlm_train_add_head.py writes one)")
    torch.manual_seed(args.seed)
    results = []
    for start in tqdm(range(0, len(samples), args.batch_size), desc="inference", unit="batch"):
        chunk = samples[start:start + args.batch_size]
        answers = [None] * len(chunk) if args.no_generate else predictor.generate(
            chunk, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample,
            temperature=args.temperature)
        heads = predictor.head_outputs(chunk) if predictor.head is not None else [None] * len(chunk)
        results += [_result(s, a, h, predictor.head) for s, a, h in zip(chunk, answers, heads)]
    summary = _summary(results, args, predictor)
    atomic_write_json(output, summary)
    print(f"wrote {len(results)} results to {output}"
          + "".join(f"; {k} {summary[k]:.4f}" for k in ("accuracy", "head_accuracy") if summary.get(k) is not None))
    return summary


def _result(sample: Sample, answer: str | None, head_value: float | None, head: TaskHead | None) -> dict[str, Any]:
    label = sample.answer()
    question = "\n".join(t.text for t in sample.prompt_turns() if t.role == "user")
    item: dict[str, Any] = {"image": [str(p) for p in sample.images] if len(sample.images) != 1
                            else str(sample.images[0]), "question": question, "label": label, "prediction": answer}
    if answer is not None and label is not None:
        item["correct"] = is_correct(answer, label)
    if head_value is not None and head is not None:
        item["head_output"] = head_value
        if head.config.head_type == "binary":
            item["head_prediction"] = "yes" if head_value >= 0.5 else "no"
            if label is not None and normalize(label).split(" ")[0] in ("yes", "no", "true", "false", "1", "0"):
                gold = normalize(label).split(" ")[0] in ("yes", "true", "1")
                item["head_correct"] = (head_value >= 0.5) == gold
    return item


def _summary(results: list[dict[str, Any]], args: argparse.Namespace, predictor: Predictor) -> dict[str, Any]:
    def accuracy(key: str) -> float | None:
        marks = [r[key] for r in results if key in r]
        return sum(marks) / len(marks) if marks else None

    return {"base_model": str(predictor.vlm.folder), "lora_path": args.lora_path, "count": len(results),
            "accuracy": accuracy("correct"), "head_accuracy": accuracy("head_correct"), "results": results}
