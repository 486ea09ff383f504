"""Answer questions about images with a (fine-tuned) VLM (lmms-finetune's infer.py): a JSON / JSONL set (the last
answer of each sample is its label, never part of the prompt) or a folder of images with --prompt; results, the
stage-2 head's outputs and accuracy go to one JSON file.

    python vlm_infer.py --lora_path out/last --data_path test.json --image_folder images --output_file results.json
"""

from library.errors import run_cli


def main(argv: list[str] | None = None):
    from library.vlm.inference import build_parser, run

    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(lambda: main() and None)  # main returns the result for callers; the exit status stays 0
