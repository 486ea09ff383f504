"""Reading and writing weight files safely, and loading them into modules with strict checks."""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import torch
from safetensors import SafetensorError, safe_open

from library.errors import UserError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

M = TypeVar("M", bound=torch.nn.Module)


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty when there is none)."""
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names of a safetensors file, from its header only (cheap, for early checks)."""
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read this .safetensors file's header ({err}); is it complete?") from err


_PICKLE_ADVICE = "Use a .safetensors file of the same data, or convert this one with a tool you trust."


def load_pickle(path: str | Path, what: str = "checkpoint", advice: str = _PICKLE_ADVICE) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; any failure is one :class:`UserError` naming ``path``.

    torch raises ``UnpicklingError`` for every pickle its restricted loader refuses (and for pickles it
    cannot parse); a refused pickle is explained by naming the object it would import (its code is never
    run), and torch's advice to retry with ``weights_only=False`` (which would run it) is never passed on.
    """
    path = Path(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = blocked_pickle_global(path, str(err))
        if blocked:
            raise UserError(
                f"{path}: refused to load this pickle file: it would import {blocked}, which is neither a tensor "
                f"nor a plain container, so loading it could run code from the file (it was not run). {advice}"
            ) from None
        raise UserError(f"{path}: cannot read this {what}: it is not a valid PyTorch file; is it complete?") from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, IndexError, TypeError, AttributeError,
            zipfile.BadZipFile) as err:
        detail = " ".join(line for line in str(err).splitlines()[:2] if "weights_only" not in line).strip()
        reason = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
        raise UserError(f"{path}: cannot read this {what}: not a valid PyTorch file ({reason}); is it "
                        "complete?") from None


_ALLOWED_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set",
                            "builtins.frozenset", "builtins.bytearray", "builtins.complex", "builtins.slice")


def blocked_pickle_global(path: Path, message: str) -> str | None:
    """The importable object (``module.name``) that made torch's restricted loader refuse ``path``: from its
    message when it names one, else the first non-torch global found by reading the pickle's opcodes."""
    found = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"global:? ['`]?([\w.]+\.[\w]+)", message)
    if found:
        return found.group(1)
    for name in _pickle_globals(path):
        if not name.startswith(_ALLOWED_GLOBAL_PREFIXES):
            return name
    return None


def _pickle_globals(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            data = archive.read(member) if member else b""
    except (zipfile.BadZipFile, OSError):
        try:
            data = path.read_bytes()
        except OSError:
            return []
    names: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # a damaged pickle: what was read so far is all there is to report
        pass
    return names


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` file, read with plain reads into process memory.

    Not memory-mapped: pages of a mapped file count in the process's resident memory for as long as a
    tensor refers to them, so loading a model (each stored tensor converted to the training dtype) would hold
    the file's pages and the converted copy at once. Read like this, each stored tensor is freed as its
    converted copy appears (``build_with_weights``).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("the file is shorter than a safetensors header")
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise ValueError(f"the header says {length} bytes, the file has {size - 8} after its size field")
        header = json.loads(f.read(length))
        metadata = header.pop("__metadata__", None) or {}
        start = 8 + length
        tensors: dict[str, torch.Tensor] = {}
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            if start + end > size:
                raise ValueError(f"tensor {name} ends at byte {start + end}, after the end of the file ({size})")
            buffer = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            if f.readinto(memoryview(buffer.numpy())) != end - begin:
                raise ValueError(f"tensor {name} is cut short")
            tensors[name] = buffer.view(dtype).reshape(entry["shape"])
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a ``.safetensors`` or pickle (``.ckpt``/``.pt``/``.bin``) file.

    Pickles are read with ``torch.load(weights_only=True)``: a file that needs arbitrary code to load is
    refused, never executed. A ``state_dict`` entry (Lightning checkpoints) is unwrapped; non-tensor
    entries other than strings are dropped.
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        try:
            return read_safetensors(path)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            raise UserError(f"{path}: cannot read this .safetensors file ({err}); is it complete?") from err
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dictionary of tensors, found {type(obj).__name__}")
    if isinstance(obj.get("state_dict"), dict):
        extra = {k: v for k, v in obj.items() if k != "state_dict" and isinstance(v, str)}
        obj = obj["state_dict"]
    else:
        extra = {}
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    extra.update({k: v for k, v in obj.items() if isinstance(v, str)})
    return tensors, extra


def find_weights_file(folder: Path, stems: tuple[str, ...]) -> list[Path]:
    """The weight file(s) of a diffusers/transformers component folder (sharded files through their index)."""
    for stem in stems:
        for suffix in (".safetensors", ".bin"):
            single = folder / f"{stem}{suffix}"
            if single.is_file():
                return [single]
            index = folder / f"{stem}{suffix}.index.json"
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
                return [folder / s for s in shards]
    found = sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin"))
    if len(found) == 1:
        return found
    names = ", ".join(f"{s}.safetensors" for s in stems)
    raise UserError(
        f"{folder}: no weights file found (expected {names} or a .bin file)"
        + (f"; found several candidates: {', '.join(p.name for p in found)}" if found else "")
    )


def read_weight_files(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(read_weights(file)[0])
    return tensors


def build_with_weights(
    build: Callable[[], M],
    state_dict: dict[str, torch.Tensor],
    what: str,
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    adapt: Callable[[dict[str, torch.Tensor], set[str]], dict[str, torch.Tensor]] | None = None,
) -> M:
    """Build a module without initialising its parameters, then load ``state_dict`` strictly.

    Parameters are created on the meta device (no random init, no double memory) and replaced by the
    loaded tensors; buffers are real. Missing or unexpected weights raise a ``UserError`` listing them.
    ``adapt(state_dict, expected_keys)`` may rename keys first (e.g. the ``text_model.`` prefix).
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = build()
    expected = set(module.state_dict().keys())
    if adapt is not None:
        state_dict = adapt(state_dict, expected)
    given = set(state_dict.keys())
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing weights, e.g. {', '.join(missing[:5])}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected weights, e.g. {', '.join(unexpected[:5])}")
        raise UserError(
            f"{what}: the weights do not match the model structure ({'; '.join(problems)}). "
            "The file is incomplete, of another architecture, or was converted incorrectly; nothing was "
            "initialised randomly."
        )
    own = module.state_dict()
    wrong = [k for k in expected if own[k].shape != state_dict[k].shape]
    if wrong:
        k = sorted(wrong)[0]
        raise UserError(
            f"{what}: {len(wrong)} weights have unexpected shapes, e.g. {k}: file {tuple(state_dict[k].shape)}, "
            f"model {tuple(own[k].shape)}"
        )
    for k in list(state_dict):  # converted in place: each stored tensor is freed once its copy exists
        v = state_dict[k]
        state_dict[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
    module.load_state_dict(state_dict, strict=True, assign=True)
    module.to(device=device)
    meta = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if meta:
        raise RuntimeError(f"{what}: parameters left uninitialised: {meta[:5]}")
    return module.eval()


_TRIM_EVERY_BYTES = 256 * 2**20


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    return tensor_bytes((*module.parameters(), *module.buffers()))


def move_module(module: M, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> M:
    """``module.to(device, dtype)``, one leaf module at a time, giving freed host memory back to the system
    as it goes (a cast leaves the old tensors' memory in the allocator's free lists otherwise, where a larger
    dtype cannot reuse it: casting a float16 model to float32 would hold up to 1.5x the float32 size).
    Bypasses diffusers' ``to`` override, which warns on every dtype cast that modules "should be kept in
    float32: []" even when that list is empty (no diffusers model here keeps any)."""
    moved = 0
    for leaf in module.modules():
        if next(leaf.children(), None) is not None:
            continue
        torch.nn.Module.to(leaf, device=device, dtype=dtype)
        moved += tensor_bytes(leaf.parameters(recurse=False))
        if moved >= _TRIM_EVERY_BYTES:
            release_host_memory()
            moved = 0
    torch.nn.Module.to(module, device=device, dtype=dtype)  # tensors owned by non-leaf modules
    if moved:
        release_host_memory()
    return module


def release_host_memory() -> None:
    """Return freed host memory to the system (glibc's ``malloc_trim``; nothing elsewhere)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass
