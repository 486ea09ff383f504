"""PEFT adapters of the captioners: applying one to a loaded base model, and merging one into a model folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from library.captioners.families import CaptionerFamily, load_captioner
from library.errors import UserError
from library.io_utils import atomic_write_json


def check_adapter_folder(path: str | Path, option: str = "--peft_model") -> Path:
    """A PEFT adapter folder (``adapter_config.json`` + weights), or a UserError saying what is wrong."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{option} {path}: no such folder (give the output folder of train_blip_network.py / "
                        "train_florence_lora.py, or one of its numbered saves)")
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"{option} {path}: no adapter_config.json, so this is not a PEFT adapter folder")
    if not any((folder / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise UserError(f"{option} {path}: adapter_config.json without adapter_model.safetensors")
    try:
        json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{option} {path}: adapter_config.json is not valid JSON ({err})") from None
    return folder


def apply_adapter(model: Any, adapter: str | Path, *, merge: bool = False) -> Any:
    """``model`` with the adapter applied (merged into its weights when ``merge``, for faster inference)."""
    from peft import PeftModel

    folder = check_adapter_folder(adapter)
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder))
    except (ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"--peft_model {adapter}: the adapter does not fit this base model "
                        f"({' '.join(str(err).split())[:300]}); use the base model it was trained on") from None
    return peft_model.merge_and_unload() if merge else peft_model


def merge_adapter(family: CaptionerFamily, base: str, adapter: str | Path, output: str | Path) -> Path:
    """Write ``base`` with ``adapter`` merged in (and the tokenizer / processor files) to ``output``, which
    must not exist yet; written into a temporary folder and renamed into place."""
    import shutil

    output = Path(output)
    if output.exists():
        raise UserError(f"{output} already exists; it is never overwritten (delete it or choose another folder)")
    captioner = load_captioner(family, base)
    merged = apply_adapter(captioner.model, adapter, merge=True)
    tmp = output.parent / f".{output.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_pretrained(str(tmp))
    if captioner.processor is not None:
        captioner.processor.save_pretrained(str(tmp))
    else:
        captioner.tokenizer.save_pretrained(str(tmp))
        captioner.image_processor.save_pretrained(str(tmp))
    atomic_write_json(tmp / "merged_from.json", {"base_model": str(base), "adapter": str(adapter)})
    tmp.rename(output)
    return output
