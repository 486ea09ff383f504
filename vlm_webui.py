"""Web UI for the VLM workflow (lmms-finetune's webui.py): ask a (fine-tuned) model about an uploaded image, and
assemble and run a vlm_train.py command from a form with a live log. Needs the optional gradio package; runs
offline on this machine.

    python vlm_webui.py --base_model MODEL [--lora_path out/last] [--port 7860]
"""

from library.errors import run_cli


def build_parser():
    from library.cli import ArgumentParser

    p = ArgumentParser(prog="vlm_webui.py", description="Web UI: ask a VLM about an image; build and run training")
    p.add_argument("--base_model", type=str, default="", help="base model folder shown on the Ask page")
    p.add_argument("--lora_path", type=str, default="", help="adapter folder shown on the Ask page")
    p.add_argument("--host", type=str, default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max_new_tokens", type=int, default=64)
    return p


def main(argv: list[str] | None = None) -> None:
    from library.tools.image_batches import default_device
    from library.vlm.webui import Answerer, build_app, require_gradio

    args = build_parser().parse_args(argv)
    require_gradio()
    app = build_app(Answerer(default_device(), args.max_new_tokens), base_model=args.base_model,
                    lora_path=args.lora_path)
    print(f"VLM web UI on http://{args.host}:{args.port}", flush=True)
    app.queue().launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False,
                       show_error=True)


if __name__ == "__main__":
    run_cli(main)
