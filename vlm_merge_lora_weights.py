"""Merge a VLM LoRA adapter into its base model (lmms-finetune's merge_lora_weights.py): the result is a plain
transformers folder with tokenizer and image processor that loads offline.

    python vlm_merge_lora_weights.py --base_model MODEL --lora_path out/last --output_path merged
"""

from library.errors import run_cli


def main(argv: list[str] | None = None) -> None:
    from library.vlm.merge import build_parser, merge

    merge(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
