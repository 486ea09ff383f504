"""Model files that live in a local folder and may be fetched from the Hugging Face Hub, never silently."""

from __future__ import annotations

import os
from pathlib import Path

from library.errors import UserError


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def download_files(repo_id: str, filenames: list[str], folder: Path, subfolder: str | None = None,
                   force: bool = False) -> None:
    """Download ``filenames`` of ``repo_id`` into ``folder``; a UserError says what to do when that fails."""
    manual = (f"download {', '.join(filenames)} from https://huggingface.co/{repo_id}"
              f"{'/tree/main/' + subfolder if subfolder else ''} into {folder}")
    if hub_offline():
        need = "--force_download needs" if force else f"{folder} lacks {', '.join(filenames)} and needs"
        raise UserError(f"{need} the Hugging Face Hub, which is disabled (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); "
                        f"{manual}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:
        raise UserError(f"{folder} lacks {', '.join(filenames)} and huggingface_hub is not installed; {manual}") \
            from err
    folder.mkdir(parents=True, exist_ok=True)
    for name in filenames:
        print(f"downloading {name} from {repo_id} to {folder}")
        try:
            downloaded = hf_hub_download(repo_id=repo_id, filename=name, subfolder=subfolder, local_dir=folder,
                                         force_download=force)
        except Exception as err:  # network, authentication, missing repo: all mean "not reachable"
            raise UserError(f"could not download {name} from the Hugging Face Hub repo {repo_id} "
                            f"({type(err).__name__}: {err}); {manual}") from err
        target = folder / name
        if Path(downloaded) != target:
            os.replace(downloaded, target)
