"""``--debug_dataset``: show what would be trained (text only; no windows, works over SSH)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from library.dataset.group import DatasetGroup
    from library.dataset.loader import EpochLoader


def debug_dataset(group: "DatasetGroup", loader: "EpochLoader", max_batches: int | None = None,
                  write: Callable[[str], None] = print, *, epochs: int | None = None, steps: int | None = None,
                  family: Any = None) -> int:
    """Print the plan (with the run's totals when ``epochs``/``steps`` are given), then per batch its bucket,
    image paths and processed captions; returns batches shown."""
    write(group.plan(num_processes=loader.num_processes, grad_accum=loader.grad_accum, epochs=epochs, steps=steps,
                     family=family))
    shown = 0
    for batch in loader:
        if max_batches is not None and shown >= max_batches:
            break
        h, w = (int(v) for v in batch["target_sizes_hw"][0])
        kind = "latents" if "latents" in batch else "images"
        write(f"epoch {batch['epoch']} step {batch['step']} batch {shown}: bucket {w}x{h}, "
              f"{len(batch['image_paths'])} {kind}")
        for i, (path, caption) in enumerate(zip(batch["image_paths"], batch["captions"])):
            extra = []
            if batch["flipped"][i]:
                extra.append("flipped")
            weight = float(batch["loss_weights"][i])
            if weight != 1.0:
                extra.append(f"loss weight {weight:g}")
            mult = float(batch["network_multipliers"][i])
            if mult != 1.0:
                extra.append(f"multiplier {mult:g}")
            suffix = f" ({', '.join(extra)})" if extra else ""
            write(f"  {path}{suffix}\n    caption: {caption!r}")
        shown += 1
    return shown
