"""Write a Lumina Image 2.0 LoRA (sd-scripts' / ComfyUI's ``lora_unet_*`` names) in the diffusers format that
``Lumina2Pipeline.load_lora_weights`` applies, with the same math as merging the LoRA.

    python networks/convert_lumina_lora_to_diffusers.py my_lumina_lora.safetensors my_lumina_lora_diffusers.safetensors

diffusers loads LoRAs into the transformer only: Gemma2 modules (``lora_te_*``) are left out (and counted).
See docs/lumina.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import ArgumentParser  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="the Lumina LoRA file written by lumina_train_network.py or sd-scripts")
    p.add_argument("output", help="the diffusers-format .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    from library.io_utils import atomic_save_file, check_output_file
    from library.lora_tools.lora_file import lora_state_dict, read_lora
    from library.lora_tools.targets import family_label, lora_family
    from library.models.lumina.diffusers_lora import to_diffusers_lora

    args = build_parser().parse_args(argv)
    output = check_output_file(args.output, "output", overwrite=args.overwrite)
    lora = read_lora(args.file)
    family = lora_family(lora.modules, lora.metadata)
    if family != "lumina":
        raise UserError(f"{args.file}: this is a {family_label(family)} LoRA, not a Lumina 2 LoRA")
    converted, skipped = to_diffusers_lora(lora_state_dict(lora.modules))
    atomic_save_file(output, lambda tmp: save_file(converted, tmp, metadata={"format": "pt"}))
    te = sum(name.startswith("lora_te_") for name in skipped)
    print(f"wrote {output}: {len(converted) // 2} diffusers LoRA layers; left out {te} Gemma2 modules"
          + (f" and {len(skipped) - te} others ({', '.join(skipped[:5])})" if len(skipped) > te else ""))
    return 0


if __name__ == "__main__":
    run_cli(main)
