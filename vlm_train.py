"""Stage 1 of the VLM workflow (lmms-finetune's train.py): LoRA / QLoRA / full fine-tuning of LLaVA-OneVision or
Qwen2.5-VL on conversations (JSON / JSONL) or a caption folder, on the toolkit's training loop.

    accelerate launch vlm_train.py --model_local_path MODEL --data_path train.json --image_folder images \\
        --output_dir out --max_train_epochs 3 --learning_rate 1e-4 --gradient_checkpointing
"""

from library.errors import run_cli


def build_parser():
    from library.vlm.training import add_lora_arguments, build_parser as build

    return build("vlm_train.py", "Fine-tune a vision-language model (LoRA, QLoRA or full)", add_lora_arguments)


def main(argv: list[str] | None = None):
    from library.config.run_config import load_run_config
    from library.vlm.training import stage1_recipe, targets_from_args, train_vlm

    args = load_run_config(build_parser(), argv)
    return train_vlm(args, stage1_recipe(args), extra_problems=targets_from_args(args).problems())


if __name__ == "__main__":
    run_cli(lambda: main() and None)  # main returns the result for callers; the exit status stays 0
