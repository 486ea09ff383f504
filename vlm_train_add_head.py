"""Stage 2 of the VLM workflow (lmms-finetune fork's train_add_head*.py): a yes/no (or regression) head on the
stage-1 model, trained with BCE on logits from a position that has seen the image; saved beside the adapter.

    python vlm_train_add_head.py --model_local_path MODEL --stage1_path out/last --data_path yesno.json \\
        --image_folder images --output_dir head_out --max_train_epochs 5 --learning_rate 1e-4
"""

from library.errors import run_cli


def build_parser():
    from library.vlm.head import add_head_arguments
    from library.vlm.training import build_parser as build

    return build("vlm_train_add_head.py", "Train a task head on a (stage-1) vision-language model",
                 add_head_arguments)


def main(argv: list[str] | None = None):
    from pathlib import Path

    import torch

    from library.config.run_config import load_run_config
    from library.vlm.head import (HeadConfig, HeadRecipe, TaskHead, head_option_problems, head_target,
                                  set_projector_trainable)
    from library.vlm.loading import apply_adapter
    from library.vlm.training import run_info, train_vlm

    args = load_run_config(build_parser(), argv)

    def check_data(data):
        for item in data.train + (data.eval or []):
            head_target(item.sample, args.head_type)

    def add_targets(items):
        return {"head_target": torch.tensor([head_target(e.sample, args.head_type) for e in items])}

    def make_recipe(vlm, data):
        vlm.model.requires_grad_(False)
        if args.stage1_path:
            apply_adapter(vlm, Path(args.stage1_path), trainable=args.train_lora)
        set_projector_trainable(vlm.model, vlm.family.projector, args.train_vision_projector)
        if args.gradient_checkpointing:
            vlm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            vlm.model.enable_input_require_grads()
        head = TaskHead(HeadConfig(vlm.family.hidden_size(), args.head_type, args.pooling)).to(vlm.model.device)
        info = {**run_info(args, data, "stage2"), "stage1_path": args.stage1_path, "head_type": args.head_type,
                "pooling": args.pooling}
        return HeadRecipe(vlm, head, use_lora=args.stage1_path is not None, info=info)

    return train_vlm(args, make_recipe, extra_problems=head_option_problems(args), tracker_name="vlm_train_add_head",
              prompts_only=True, check_data=check_data, add=add_targets)


if __name__ == "__main__":
    run_cli(lambda: main() and None)  # main returns the result for callers; the exit status stays 0
