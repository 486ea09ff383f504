"""The VLMs the vlm_* scripts support (lmms-finetune's supported_models.py): model id, Hugging Face path, family.
Pass an id or path to vlm_train.py --model_id (used only when it is in the local cache or the hub is reachable),
or a local folder with --model_local_path."""

from library.errors import run_cli


def main(argv: list[str] | None = None) -> None:
    from library.cli import ArgumentParser
    from library.vlm.families import SUPPORTED_MODELS

    ArgumentParser(prog="vlm_supported_models.py", description=__doc__).parse_args(argv)
    width = max(len(m.model_id) for m in SUPPORTED_MODELS)
    path_width = max(len(m.hf_path) for m in SUPPORTED_MODELS)
    print(f"{'model_id':<{width}}  {'hf_path':<{path_width}}  family")
    for m in SUPPORTED_MODELS:
        print(f"{m.model_id:<{width}}  {m.hf_path:<{path_width}}  {m.family}")


if __name__ == "__main__":
    run_cli(main)
