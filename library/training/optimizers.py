"""Optimizer creation from the sd-scripts options.

Public API (stable):

- ``add_optimizer_arguments(parser)``: ``--optimizer_type`` (empty = AdamW), ``--optimizer_args k=v ...``,
  ``--learning_rate`` (2e-6), ``--max_grad_norm`` (1.0; 0 disables clipping), ``--use_8bit_adam``,
  ``--use_lion_optimizer`` (legacy spellings of AdamW8bit / Lion), ``--fused_backward_pass``.
- ``parse_optimizer_args(items) -> dict``: ``key=value`` items, values through ``ast.literal_eval``
  (``betas=0.9,0.999`` is a tuple, ``True``/``true`` a bool, a bare word a string, ``=`` allowed in values).
- ``resolve_optimizer_type(args) -> str``: the canonical name (``AdamW``, ``Lion``, ``torch.optim.RMSprop`` ...).
- ``validate_optimizer_args(args)``: every problem (bad items, unknown name, missing package, conflicting
  legacy flags, ``--fused_backward_pass`` without Adafactor) as one ``UserError``, before models load.
- ``create_optimizer(params_or_groups, args) -> (name_for_metadata, optimizer)``. ``name_for_metadata`` is the
  ``ss_optimizer`` string ``module.Class(k=v,...)``.
- ``uses_relative_step(optimizer) -> bool``: Adafactor with ``relative_step`` computes its own learning rate;
  the lr options are then ignored and ``schedulers.create_scheduler(..., adafactor_relative_step=True)``
  must be used. ``args`` is never modified (the reference rewrote ``args.learning_rate`` / ``lr_scheduler``).
- ``is_schedule_free(optimizer)`` and ``optimizer_train_eval(optimizer, train)``: schedule-free optimizers
  (``schedulefree``, ``prodigyplus``...) must be switched to eval mode before sampling/saving and back after.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import inspect
import logging
import re
from typing import Any, Iterable

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

# lowercase name -> (module, class, extra default kwargs)
KNOWN_OPTIMIZERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "adamw": ("torch.optim", "AdamW", {}),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", {}),
    "pagedadamw": ("bitsandbytes.optim", "PagedAdamW", {}),
    "pagedadamw8bit": ("bitsandbytes.optim", "PagedAdamW8bit", {}),
    "pagedadamw32bit": ("bitsandbytes.optim", "PagedAdamW32bit", {}),
    "lion": ("lion_pytorch", "Lion", {}),
    "lion8bit": ("bitsandbytes.optim", "Lion8bit", {}),
    "pagedlion8bit": ("bitsandbytes.optim", "PagedLion8bit", {}),
    "sgdnesterov": ("torch.optim", "SGD", {"nesterov": True, "momentum": 0.9}),
    "sgdnesterov8bit": ("bitsandbytes.optim", "SGD8bit", {"nesterov": True, "momentum": 0.9}),
    "dadaptation": ("dadaptation.experimental", "DAdaptAdamPreprint", {}),
    "dadaptadampreprint": ("dadaptation.experimental", "DAdaptAdamPreprint", {}),
    "dadaptadagrad": ("dadaptation", "DAdaptAdaGrad", {}),
    "dadaptadam": ("dadaptation", "DAdaptAdam", {}),
    "dadaptadan": ("dadaptation", "DAdaptAdan", {}),
    "dadaptadanip": ("dadaptation.experimental", "DAdaptAdanIP", {}),
    "dadaptlion": ("dadaptation", "DAdaptLion", {}),
    "dadaptsgd": ("dadaptation", "DAdaptSGD", {}),
    "prodigy": ("prodigyopt", "Prodigy", {}),
    "adafactor": ("transformers.optimization", "Adafactor", {}),
    "radamschedulefree": ("schedulefree", "RAdamScheduleFree", {}),
    "adamwschedulefree": ("schedulefree", "AdamWScheduleFree", {}),
    "sgdschedulefree": ("schedulefree", "SGDScheduleFree", {}),
}
CANONICAL_NAMES = {
    "adamw": "AdamW", "adamw8bit": "AdamW8bit", "pagedadamw": "PagedAdamW", "pagedadamw8bit": "PagedAdamW8bit",
    "pagedadamw32bit": "PagedAdamW32bit", "lion": "Lion", "lion8bit": "Lion8bit", "pagedlion8bit": "PagedLion8bit",
    "sgdnesterov": "SGDNesterov", "sgdnesterov8bit": "SGDNesterov8bit", "dadaptation": "DAdaptation",
    "dadaptadampreprint": "DAdaptAdamPreprint", "dadaptadagrad": "DAdaptAdaGrad", "dadaptadam": "DAdaptAdam",
    "dadaptadan": "DAdaptAdan", "dadaptadanip": "DAdaptAdanIP", "dadaptlion": "DAdaptLion", "dadaptsgd": "DAdaptSGD",
    "prodigy": "Prodigy", "adafactor": "AdaFactor", "radamschedulefree": "RAdamScheduleFree",
    "adamwschedulefree": "AdamWScheduleFree", "sgdschedulefree": "SGDScheduleFree",
}
# top-level module -> pip requirement to suggest when it is missing
INSTALL_HINTS = {
    "bitsandbytes": "bitsandbytes==0.50.2",
    "lion_pytorch": "lion-pytorch==0.2.5",
    "dadaptation": "dadaptation==3.2",
    "prodigyopt": "prodigyopt==1.1.2",
    "schedulefree": "schedulefree==1.4.1",
    "pytorch_optimizer": "pytorch-optimizer==3.9.0",
    "prodigyplus": "prodigy-plus-schedule-free==1.9.2",
}
_BARE_WORD = re.compile(r"^[A-Za-z_][\w.\-]*$")


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the optimizer options (sd-scripts names and defaults)."""
    g = parser.add_argument_group("optimizer")
    g.add_argument("--optimizer_type", type=str, default="",
                   help="optimizer: AdamW (default), AdamW8bit, PagedAdamW8bit, Lion, Lion8bit, PagedLion8bit, "
                        "SGDNesterov, SGDNesterov8bit, DAdaptation(DAdaptAdamPreprint), DAdaptAdaGrad, DAdaptAdam, "
                        "DAdaptAdan, DAdaptAdanIP, DAdaptLion, DAdaptSGD, Prodigy, AdaFactor, RAdamScheduleFree, "
                        "AdamWScheduleFree, SGDScheduleFree, any torch.optim class name, or module.Class")
    g.add_argument("--optimizer_args", type=str, default=None, nargs="*",
                   help='optimizer keyword arguments, e.g. "weight_decay=0.01" "betas=0.9,0.999"')
    g.add_argument("--learning_rate", type=float, default=2.0e-6, help="learning rate")
    g.add_argument("--max_grad_norm", type=float, default=1.0,
                   help="clip gradients to this norm (0 disables clipping)")
    g.add_argument("--use_8bit_adam", action="store_true", help="same as --optimizer_type AdamW8bit (legacy)")
    g.add_argument("--use_lion_optimizer", action="store_true", help="same as --optimizer_type Lion (legacy)")
    g.add_argument("--fused_backward_pass", action="store_true",
                   help="apply the optimizer step during backward to save memory (AdaFactor, no grad accumulation)")


def _parse_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if _BARE_WORD.match(text):
            return text
        raise


def parse_optimizer_args(items: Iterable[str] | None, option: str = "--optimizer_args") -> dict[str, Any]:
    """Turn ``["weight_decay=0.01", "betas=0.9,0.999"]`` into typed keyword arguments."""
    kwargs: dict[str, Any] = {}
    problems = []
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            problems.append(f"{option} item {item!r} is not key=value (e.g. weight_decay=0.01)")
            continue
        try:
            kwargs[key] = _parse_value(value.strip())
        except (ValueError, SyntaxError):
            problems.append(f"{option} item {item!r}: cannot read the value {value!r}; use a Python literal such "
                            f"as 0.01, True, 0.9,0.999 or a quoted string")
    if problems:
        raise UserError.from_problems(f"invalid {option}", problems)
    return kwargs


def resolve_optimizer_type(args: Any) -> str:
    """Canonical optimizer name from ``--optimizer_type`` and the legacy flags."""
    name = (getattr(args, "optimizer_type", "") or "").strip()
    use_8bit = bool(getattr(args, "use_8bit_adam", False))
    use_lion = bool(getattr(args, "use_lion_optimizer", False))
    if use_8bit and use_lion:
        raise UserError("--use_8bit_adam and --use_lion_optimizer cannot be used together; use --optimizer_type")
    if (use_8bit or use_lion) and name:
        flag = "--use_8bit_adam" if use_8bit else "--use_lion_optimizer"
        raise UserError(f"{flag} conflicts with --optimizer_type {name}; remove {flag}")
    if not name:
        return "AdamW8bit" if use_8bit else "Lion" if use_lion else "AdamW"
    return CANONICAL_NAMES.get(name.lower(), name)


def _import_hint(module: str) -> str:
    top = module.split(".")[0]
    req = INSTALL_HINTS.get(top, top.replace("_", "-"))
    return f"pip install {req}"


def optimizer_class(name: str) -> tuple[type, dict[str, Any]]:
    """The optimizer class for a canonical name and its default keyword arguments; UserError if unavailable."""
    known = KNOWN_OPTIMIZERS.get(name.lower())
    if known is not None:
        module_name, class_name, defaults = known
    elif "." in name:
        module_name, _, class_name = name.rpartition(".")
        defaults = {}
    else:
        cls = getattr(torch.optim, name, None)
        if cls is None:
            by_lower = {n.lower(): n for n in dir(torch.optim) if inspect.isclass(getattr(torch.optim, n))}
            cls = getattr(torch.optim, by_lower.get(name.lower(), ""), None)
        if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer):
            return cls, {}
        choices = list(CANONICAL_NAMES.values()) + [n for n in dir(torch.optim) if n[0].isupper()]
        close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise UserError(f"--optimizer_type {name!r} is not a known optimizer nor a torch.optim class{hint} "
                        "(other optimizers: give module.Class, e.g. pytorch_optimizer.CAME)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"--optimizer_type {name} needs the Python package providing {module_name!r}, which is "
                        f"not installed ({err}); install it with: {_import_hint(module_name)}") from err
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(f"--optimizer_type {name}: module {module_name!r} has no class {class_name!r}")
    return cls, dict(defaults)


def validate_optimizer_args(args: Any) -> None:
    """Check the optimizer options (name, package, items, fused backward) without creating anything."""
    problems = []
    cls = None
    try:
        name = resolve_optimizer_type(args)
        cls, _ = optimizer_class(name)
    except UserError as err:
        problems.append(err.message)
        name = ""
    try:
        items = parse_optimizer_args(getattr(args, "optimizer_args", None))
        if cls is not None:
            problems += _unknown_keyword_problems(name, cls, items)
    except UserError as err:
        problems.append(err.message)
    if getattr(args, "fused_backward_pass", False):
        if name and name.lower() != "adafactor":
            problems.append(f"--fused_backward_pass works only with --optimizer_type AdaFactor, not {name}")
        if getattr(args, "gradient_accumulation_steps", 1) > 1:
            problems.append("--fused_backward_pass cannot be used with --gradient_accumulation_steps > 1")
    lr = getattr(args, "learning_rate", 2.0e-6)
    if lr is not None and lr < 0:
        problems.append(f"--learning_rate must not be negative, got {lr}")
    if getattr(args, "max_grad_norm", 1.0) < 0:
        problems.append(f"--max_grad_norm must not be negative (0 disables clipping), got {args.max_grad_norm}")
    if problems:
        raise UserError.from_problems("invalid optimizer options", problems)


def _unknown_keyword_problems(name: str, cls: type, items: dict[str, Any]) -> list[str]:
    """``--optimizer_args`` keys the optimizer's constructor does not take (none when it takes ``**kwargs``)."""
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return []
    accepted = [n for n in parameters if n not in ("self", "params")]
    problems = []
    for key in items:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"--optimizer_args {key}=...: {name} takes no argument {key!r}{hint}; it takes "
                            f"{', '.join(accepted)}")
    return problems


def _group_lrs(params: list[Any]) -> set[float]:
    return {g["lr"] for g in params if isinstance(g, dict) and g.get("lr") is not None}


def create_optimizer(params_or_groups: Iterable[Any], args: Any) -> tuple[str, torch.optim.Optimizer]:
    """Create the optimizer named by ``args``; returns ``(ss_optimizer string, optimizer)``.

    ``params_or_groups`` is an iterable of tensors or of param-group dicts (which may carry their own ``lr``).
    ``args.learning_rate`` is the default lr. For AdaFactor, ``relative_step`` defaults to True (as in
    sd-scripts), in which case the lr options are ignored (see :func:`uses_relative_step`).
    """
    name = resolve_optimizer_type(args)
    cls, kwargs = optimizer_class(name)
    kwargs.update(parse_optimizer_args(getattr(args, "optimizer_args", None)))
    params = list(params_or_groups)
    lr: float | None = getattr(args, "learning_rate", 2.0e-6)
    lname = name.lower()

    if lname.startswith("dadapt") or lname == "prodigy":
        if lr is not None and lr <= 0.1:
            logger.warning("%s adapts the learning rate itself; --learning_rate is a multiplier and usually 1.0, "
                           "got %s", name, lr)
        if len(_group_lrs(params)) > 1:
            logger.warning("%s with several learning rates: the adapted step size is shared, only the ratios "
                           "between groups matter", name)
    if lname == "adafactor":
        kwargs.setdefault("relative_step", True)
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            logger.warning("AdaFactor warmup_init=True needs relative_step=True; enabling relative_step")
            kwargs["relative_step"] = True
        if kwargs["relative_step"]:
            logger.info("AdaFactor with relative_step=True computes its own learning rate; the lr options are "
                        "ignored and the adafactor lr schedule is used")
            lr = None
            params = [{k: v for k, v in g.items() if k != "lr"} if isinstance(g, dict) else g for g in params]
        else:
            if getattr(args, "max_grad_norm", 0.0):
                logger.warning("AdaFactor with relative_step=False: --max_grad_norm 0 is recommended")

    try:
        optimizer = cls(params, lr=lr, **kwargs) if lr is not None else cls(params, **kwargs)
    except TypeError as err:
        raise UserError(f"--optimizer_type {name} ({cls.__module__}.{cls.__name__}) rejected the arguments "
                        f"{kwargs}: {err}; check --optimizer_args") from err
    except ValueError as err:
        raise UserError(f"--optimizer_type {name}: invalid setting ({err}); check --learning_rate and "
                        "--optimizer_args") from err
    return metadata_name(cls, kwargs), optimizer


def metadata_name(cls: type, kwargs: dict[str, Any]) -> str:
    """``module.Class(k=v,...)`` as written to ``ss_optimizer``."""
    args_text = ",".join(f"{k}={v}" for k, v in kwargs.items())
    base = f"{cls.__module__}.{cls.__name__}"
    return f"{base}({args_text})" if args_text else base


def _unwrap(optimizer: Any) -> Any:
    """The optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def uses_relative_step(optimizer: Any) -> bool:
    """True for an AdaFactor that computes its own learning rate (relative_step=True)."""
    opt = _unwrap(optimizer)
    return type(opt).__name__ == "Adafactor" and bool(opt.defaults.get("relative_step", False))


def is_schedule_free(optimizer: Any) -> bool:
    """True if the optimizer has schedule-free ``train()`` / ``eval()`` modes."""
    opt = _unwrap(optimizer)
    return callable(getattr(opt, "train", None)) and callable(getattr(opt, "eval", None))


def optimizer_train_eval(optimizer: Any, train: bool) -> None:
    """Put a schedule-free optimizer in train or eval mode (eval before sampling/saving); no-op for others."""
    if is_schedule_free(optimizer):
        opt = _unwrap(optimizer)
        if train:
            opt.train()
        else:
            opt.eval()
