"""Finding image files. Shared by the datasets and the dataset-preparation tools."""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def is_image_file(path: str | Path) -> bool:
    """True for the supported image extensions, in any letter case."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files directly in ``folder`` (or below it with ``recursive``), sorted by path."""
    folder = Path(folder)
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if is_image_file(p) and p.is_file())
