"""The VLM web UI (lmms-finetune's webui.py): an "Ask" page (pick a base model and an adapter, upload an image, ask,
read the answer) and a "Train" page that assembles a vlm_train.py command from a form and runs it with a live log.

Gradio is optional and imported only by :func:`build_app`; the answering and command-building parts work without
it. Everything is served locally: no analytics, no share link, system fonts instead of web fonts.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from library.errors import UserError

GRADIO_HINT = "pip install gradio==6.31.0"
REPO_ROOT = Path(__file__).resolve().parents[2]


def require_gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise UserError(f"vlm_webui.py needs the optional gradio package, which is not installed: {GRADIO_HINT} "
                        "(the other vlm_* scripts do not need it)") from None
    return gradio


@dataclass
class Answerer:
    """Answers questions, keeping the last loaded base model + adapter."""

    device: torch.device
    max_new_tokens: int = 64
    _loaded: tuple[str, str] | None = None
    _predictor: Any = field(default=None, repr=False)

    def predictor(self, base: str, adapter: str) -> Any:
        from library.vlm.inference import load_predictor

        key = (base.strip(), adapter.strip())
        if key != self._loaded:
            self._predictor = load_predictor(key[0] or None, key[1] or None, self.device)
            self._loaded = key
        return self._predictor

    def answer(self, base: str, adapter: str, image: Any, question: str) -> str:
        from library.vlm.data import IMAGE_PLACEHOLDER, Sample, Turn

        if image is None:
            raise UserError("upload an image first")
        if not base.strip() and not adapter.strip():
            raise UserError("give a base model folder (or an adapter folder that records its base model)")
        predictor = self.predictor(base, adapter)
        text = question.strip() or "Describe this image."
        prompt = text if IMAGE_PLACEHOLDER in text else f"{IMAGE_PLACEHOLDER}\n{text}"
        sample = Sample([Path("uploaded image")], [Turn("user", prompt)], None, "the uploaded image")
        return predictor.generate([sample], images=[image.convert("RGB")], max_new_tokens=self.max_new_tokens)[0]


TRAIN_FIELDS: tuple[tuple[str, str, Any], ...] = (
    # (option, label, default): the form of the Train page, in order
    ("model_local_path", "Base model folder", ""),
    ("data_path", "Training data (JSON / JSONL)", ""),
    ("eval_data_path", "Held-out data (optional)", ""),
    ("image_folder", "Image folder", ""),
    ("output_dir", "Output folder", ""),
    ("max_train_epochs", "Epochs", 3),
    ("learning_rate", "Learning rate", 1e-4),
    ("train_batch_size", "Batch size", 1),
    ("gradient_accumulation_steps", "Gradient accumulation", 1),
    ("lora_r", "LoRA rank", 8),
    ("lora_alpha", "LoRA alpha", 16),
    ("model_max_length", "Max length (tokens, images included)", 2048),
    ("save_every_n_steps", "Save every N steps (0: only at the end)", 0),
)
TRAIN_FLAGS: tuple[tuple[str, str], ...] = (
    ("q_lora", "QLoRA (4-bit base, needs bitsandbytes)"),
    ("gradient_checkpointing", "Gradient checkpointing"),
    ("save_state", "Save resumable states"),
)


def training_command(values: dict[str, Any], *, num_processes: int = 1) -> list[str]:
    """The vlm_train.py command for a filled-in form (empty fields are left out)."""
    if num_processes > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(num_processes)]
    else:
        command = [sys.executable]
    command.append(str(REPO_ROOT / "vlm_train.py"))
    for option, _, _ in TRAIN_FIELDS:
        value = values.get(option)
        if value in (None, "") or (option == "save_every_n_steps" and not value):
            continue
        if isinstance(value, float) and value.is_integer() and option != "learning_rate":
            value = int(value)
        command += [f"--{option}", str(value)]
    command += [f"--{flag}" for flag, _ in TRAIN_FLAGS if values.get(flag)]
    command += ["--logging_dir", str(Path(values["output_dir"]) / "logs")] if values.get("output_dir") else []
    return command


def stream_command(command: list[str]) -> Iterator[str]:
    """Run ``command`` and yield the log so far after each line (the Train page's live log)."""
    log = f"$ {shlex.join(command)}\n"
    yield log
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
                          env=env, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            log += line.replace("\r", "\n")
            yield log
    yield log + f"\n[exit status {process.returncode}]\n"


def build_app(answerer: Answerer, *, base_model: str = "", lora_path: str = "") -> Any:
    gr = require_gradio()
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])

    def ask(base: str, adapter: str, image: Any, question: str) -> str:
        try:
            return answerer.answer(base, adapter, image, question)
        except UserError as err:
            raise gr.Error(err.message) from None

    with gr.Blocks(title="VLM fine-tuning", theme=theme, analytics_enabled=False) as app:
        with gr.Tab("Ask"):
            base = gr.Textbox(label="Base model folder", value=base_model, elem_id="base_model")
            adapter = gr.Textbox(label="Adapter folder (optional)", value=lora_path, elem_id="lora_path")
            image = gr.Image(label="Image", type="pil", elem_id="image")
            question = gr.Textbox(label="Question", value="Describe this image.", elem_id="question")
            button = gr.Button("Ask", elem_id="ask")
            answer = gr.Textbox(label="Answer", elem_id="answer", interactive=False)
            button.click(ask, [base, adapter, image, question], answer)
        with gr.Tab("Train"):
            inputs = []
            for option, label, default in TRAIN_FIELDS:
                kind = gr.Number if isinstance(default, (int, float)) else gr.Textbox
                inputs.append(kind(label=label, value=default, elem_id=f"train_{option}"))
            inputs += [gr.Checkbox(label=label, value=False, elem_id=f"train_{flag}") for flag, label in TRAIN_FLAGS]
            processes = gr.Number(label="GPUs (processes)", value=1, precision=0, elem_id="train_processes")
            command_box = gr.Textbox(label="Command", elem_id="train_command", interactive=False)
            log = gr.Textbox(label="Log", lines=20, elem_id="train_log", interactive=False, autoscroll=True)
            names = [o for o, _, _ in TRAIN_FIELDS] + [f for f, _ in TRAIN_FLAGS]

            def command_of(*values: Any) -> list[str]:
                return training_command(dict(zip(names, values[:-1])), num_processes=int(values[-1] or 1))

            def show(*values: Any) -> str:
                return shlex.join(command_of(*values))

            def run(*values: Any) -> Iterator[tuple[str, str]]:
                command = command_of(*values)
                for text in stream_command(command):
                    yield shlex.join(command), text

            gr.Button("Show command", elem_id="train_show").click(show, inputs + [processes], command_box)
            gr.Button("Run training", elem_id="train_run").click(run, inputs + [processes], [command_box, log])
    return app
