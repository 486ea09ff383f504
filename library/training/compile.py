"""``--torch_compile`` / ``--dynamo_backend`` (sd-scripts' names and choices): the denoiser's forward compiled in
place by ``torch.compile`` once it is placed. In place (``nn.Module.compile``) keeps the module, its parameter
names and its hooks, so LoRA wrappers, saving, EMA and resume see the same model; the LoRA modules' forwards are
traced into the denoiser's graph. The backend is checked before any model loads."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil

import torch

#: sd-scripts' ``--dynamo_backend`` choices (``tensort`` is its spelling)
DYNAMO_BACKENDS = ("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                   "fx2trt", "onnxrt", "tensort", "ipex", "tvm")
_REMOVED = ("aot_ts_nvfuser", "nvprims_nvfuser", "ofi")  # no longer in PyTorch 2.x
_TORCH_NAME = {"fx2trt": "tensorrt", "tensort": "tensorrt"}
_PACKAGE = {"onnxrt": "onnxruntime", "tvm": "tvm", "ipex": "intel_extension_for_pytorch",
            "fx2trt": "torch_tensorrt", "tensort": "torch_tensorrt"}


def compile_problems(args: argparse.Namespace, *, cuda: bool) -> list[str]:
    """What makes ``--torch_compile`` unusable here, found from the flags and the installed packages."""
    if not getattr(args, "torch_compile", False):
        return []
    backend = args.dynamo_backend
    where = f"--torch_compile --dynamo_backend {backend}"
    if getattr(args, "blocks_to_swap", None):
        return [f"{where} cannot be combined with --blocks_to_swap: swapping moves weights between devices inside "
                "the forward pass, which a compiled graph does not allow; drop one of them"]
    if backend in _REMOVED:
        return [f"{where}: this backend is no longer part of PyTorch; use --dynamo_backend inductor"]
    if backend == "cudagraphs" and not cuda:
        return [f"{where} needs a CUDA GPU; use --dynamo_backend inductor (or eager) here"]
    if backend == "inductor":
        return _inductor_problems(where, cuda)
    package = _PACKAGE.get(backend)
    if package and importlib.util.find_spec(package) is None:
        return [f"{where} needs the {package} package, which is not installed: pip install {package}, or use "
                "--dynamo_backend inductor"]
    return []


def _inductor_problems(where: str, cuda: bool) -> list[str]:
    if cuda and importlib.util.find_spec("triton") is None:
        return [f"{where} on a GPU needs triton (pip install triton), or use --dynamo_backend eager"]
    compiler = os.environ.get("CXX") or "g++"
    if not cuda and shutil.which(compiler) is None and shutil.which("clang++") is None:
        return [f"{where} on the CPU needs a C++ compiler ({compiler} not found): install one (apt install g++), or "
                "use --dynamo_backend eager"]
    return []


def compile_denoiser(denoiser: torch.nn.Module, args: argparse.Namespace, *, verbose: bool) -> None:
    """Compile ``denoiser``'s forward in place with ``--dynamo_backend`` (nothing without ``--torch_compile``)."""
    if not getattr(args, "torch_compile", False):
        return
    backend = _TORCH_NAME.get(args.dynamo_backend, args.dynamo_backend)
    if backend == "ipex":
        import intel_extension_for_pytorch  # noqa: F401  (registers the backend)
    denoiser.compile(backend=backend)
    if verbose:
        print(f"torch.compile ({backend}): the denoiser is compiled during its first steps", flush=True)
