"""What the ``--network_args`` of the transformer families' LoRAs (``networks.lora_flux``, ``networks.lora_sd3``,
``networks.lora_lumina``) share: the value checks, the options every one of them has (rank, alpha, dropouts,
per-type ranks, ``verbose``, LoRA+ ratios, the shapes of a file) and how a module's rank follows from them."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

from library.errors import UserError

LORAPLUS_ARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


@dataclass(frozen=True, kw_only=True)
class FusedLoRAOptions:
    """Parsed ``--network_args`` (plus ``--network_dim``/``--network_alpha``/``--network_dropout``), or, with
    ``modules_dim``, the ranks and alphas of a LoRA file. A family adds its own fields and sets
    :attr:`TYPE_FRAGMENTS`: for each entry of ``type_dims``, the name fragments that must all occur in a module's
    name for that rank to apply."""

    TYPE_FRAGMENTS: ClassVar[tuple[tuple[str, ...], ...]] = ()
    # what a network made from a file keeps of its --network_args (the file gives the shapes)
    FILE_KEEPS: ClassVar[tuple[str, ...]] = ("dropout", "rank_dropout", "module_dropout") + LORAPLUS_ARGS

    dim: int = 4
    alpha: float = 1.0
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    type_dims: tuple[int | None, ...] = ()
    verbose: bool = False
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    modules_dim: Mapping[str, int] | None = field(default=None, repr=False)
    modules_alpha: Mapping[str, float] | None = field(default=None, repr=False)

    def rank_for(self, lora_name: str, selected: bool = True) -> tuple[int, float] | None:
        """``(rank, alpha)`` of a block or text-encoder module (``selected``: its block trains), or None (no LoRA):
        ``dim``, or the first per-type rank whose fragments all occur in the name."""
        if self.modules_dim is not None:
            return self._from_file(lora_name)
        dim = self.dim
        for type_dim, fragments in zip(self.type_dims, self.TYPE_FRAGMENTS):
            if type_dim is not None and all(f in lora_name for f in fragments):
                dim = type_dim
                break
        return (dim, self.alpha) if dim and selected else None

    def text_encoder_rank(self, lora_name: str) -> tuple[int, float] | None:
        """``(rank, alpha)`` of a text-encoder module, or None."""
        return self.rank_for(lora_name)

    def listed_rank(self, lora_name: str, ranks: Sequence[int] | None, index: int) -> tuple[int, float] | None:
        """``(rank, alpha)`` of a module whose rank is entry ``index`` of a list option (embedder ranks), or None."""
        if self.modules_dim is not None:
            return self._from_file(lora_name)
        return (ranks[index], self.alpha) if ranks and ranks[index] else None

    def _from_file(self, lora_name: str) -> tuple[int, float] | None:
        if lora_name not in (self.modules_dim or {}):
            return None
        dim = self.modules_dim[lora_name]
        return dim, (self.modules_alpha or {}).get(lora_name, dim)

    def for_file(self, modules_dim: Mapping[str, int], modules_alpha: Mapping[str, float]) -> FusedLoRAOptions:
        """Options of the same family shaped by a file's ranks and alphas, keeping :attr:`FILE_KEEPS` of these."""
        return type(self)(**{k: getattr(self, k) for k in self.FILE_KEEPS}, modules_dim=modules_dim,
                          modules_alpha=modules_alpha)


def parse_block_selection(value: str | None, total: int, key: str) -> list[bool]:
    """``all``, ``none``, or comma-separated indices and ranges (``0,2-4``) -> one flag per block."""
    if value is None or value == "all":
        return [True] * total
    if value in ("none", ""):
        return [False] * total
    selected = [False] * total
    for part in value.split(","):
        try:
            bounds = [int(p) for p in part.strip().split("-")]
        except ValueError:
            raise UserError(f"--network_args {key}={value!r}: {part!r} is not an index or a range like 2-5") from None
        start, end = bounds[0], bounds[-1]
        if len(bounds) > 2 or not 0 <= start <= end < total:
            raise UserError(f"--network_args {key}={value!r}: {part!r} is outside 0..{total - 1} (this model has "
                            f"{total} such blocks)")
        for i in range(start, end + 1):
            selected[i] = True
    return selected


def _number(key: str, value: Any, kind: type) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"--network_args {key}={value!r}: expected a {kind.__name__}") from None


def _probability(key: str, value: Any) -> float | None:
    if value is None:
        return None
    p = _number(key, value, float)
    if not 0 <= p < 1:
        raise UserError(f"--network_args {key}={value!r}: expected a probability in [0, 1)")
    return p


def network_args_getter(kwargs: Mapping[str, Any], known: Sequence[str], module: str) -> Callable[[str], Any]:
    """Refuse unknown ``--network_args`` of ``module`` (all at once, each with a "did you mean"); return a getter
    that reads an empty value or ``None`` as not given."""
    problems = []
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
            problems.append(f"{key!r} is not an argument of {module} ({hint})")
    if problems:
        raise UserError.from_problems("--network_args", problems)

    def get(key: str) -> Any:
        value = kwargs.get(key)
        return None if value is None or str(value).strip() in ("", "None") else value

    return get


def _flag(key: str, value: Any) -> bool:
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise UserError(f"--network_args {key}={value!r}: expected True or False")
    return text in ("true", "1")


def given_flag(get: Callable[[str], Any], key: str) -> bool:
    """A True/False network arg; not given is False."""
    return get(key) is not None and _flag(key, get(key))


def refuse_split_qkv(get: Callable[[str], Any]) -> None:
    """For the families whose qkv LoRA is always the fused one."""
    if given_flag(get, "split_qkv"):
        raise UserError("--network_args split_qkv=True is not supported: the fused qkv LoRA is what ComfyUI and "
                        "sd-scripts read; remove split_qkv")


def rank_list(key: str, value: Any, names: Sequence[str]) -> tuple[int, ...]:
    """A list of ranks, one per name (``[4,0,8]``, brackets optional)."""
    parts = [p.strip() for p in str(value).strip().strip("[]").split(",") if p.strip()]
    if len(parts) != len(names):
        raise UserError(f"--network_args {key}={value!r}: expected {len(names)} ranks [{', '.join(names)}]")
    return tuple(_number(key, p, int) for p in parts)


def common_option_values(get: Callable[[str], Any], type_dim_args: Sequence[str], network_dim: int | None,
                         network_alpha: float | None, neuron_dropout: float | None) -> dict[str, Any]:
    """The fields of :class:`FusedLoRAOptions` every family parses alike (all but ``verbose``), checked in this
    order: LoRA+ ratios, rank, alpha, dropouts, per-type ranks."""
    values: dict[str, Any] = {k: None if get(k) is None else _number(k, get(k), float) for k in LORAPLUS_ARGS}
    values.update(
        dim=4 if network_dim is None else int(network_dim),
        alpha=1.0 if network_alpha is None else float(network_alpha),
        dropout=_probability("dropout", neuron_dropout if neuron_dropout is not None else get("dropout")),
        rank_dropout=_probability("rank_dropout", get("rank_dropout")),
        module_dropout=_probability("module_dropout", get("module_dropout")),
        type_dims=tuple(None if get(k) is None else _number(k, get(k), int) for k in type_dim_args),
    )
    return values
