"""Show what a LoRA file holds: family, modules, ranks, alphas, norms, unusual keys, metadata problems, and
whether this toolkit's networks.lora and diffusers load it.

    python networks/check_lora_weights.py my_lora.safetensors [--show_all_keys] [--no_loaders]

See docs/lora_tools.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import ArgumentParser  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.lora_tools.commands import run_check  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="LoRA file to check (.safetensors, .ckpt or .pt)")
    p.add_argument("-s", "--show_all_keys", action="store_true",
                   help="also print every key: name,shape,mean |value|,min |value| (as sd-scripts does)")
    p.add_argument("--no_loaders", action="store_true",
                   help="skip the loader checks (they build full-size models on the meta device, a few seconds)")
    return p


def main(argv: list[str] | None = None) -> int:
    run_check(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
