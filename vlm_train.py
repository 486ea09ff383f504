"""Stage 1 of the VLM workflow (lmms-finetune's train.py): LoRA / QLoRA / full fine-tuning of LLaVA-OneVision or
Qwen2.5-VL on conversations (JSON / JSONL) or a caption folder, on the toolkit's training loop.

    accelerate launch vlm_train.py --model_local_path MODEL --data_path train.json --image_folder images \\
        --output_dir out --max_train_epochs 3 --learning_rate 1e-4 --gradient_checkpointing
"""

from library.errors import run_cli


def build_parser():
    from library.vlm.training import build_parser as build

    return build("vlm_train.py", "Fine-tune a vision-language model (LoRA, QLoRA or full)")


def main(argv: list[str] | None = None) -> None:
    from library.config.run_config import load_run_config
    from library.vlm.adapters import apply_targets
    from library.vlm.recipe import VLMRecipe
    from library.vlm.training import run_info, targets_from_args, train_vlm

    args = load_run_config(build_parser(), argv)

    def make_recipe(vlm, data):
        vlm.model = apply_targets(vlm.model, vlm.family, targets_from_args(args),
                                  gradient_checkpointing=args.gradient_checkpointing)
        return VLMRecipe(vlm, use_lora=args.use_lora, info=run_info(args, data, "stage1"))

    train_vlm(args, make_recipe)


if __name__ == "__main__":
    run_cli(main)
