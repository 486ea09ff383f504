"""The full-weight recipe: DreamBooth (train_db.py) and fine-tuning (fine_tune.py) train the UNet itself and,
optionally, the text encoder, and save a whole Stable Diffusion model.

The two scripts differ only in how the text encoder's training is chosen: DreamBooth trains it by default
and ``--stop_text_encoder_training N`` freezes it from step N on (-1 or 0: never trained);
fine-tuning trains it only with ``--train_text_encoder``. Everything else (loop, datasets, losses,
optimizers, saving, state) is shared, including with train_network.py.

An exponential moving average of the trained weights (``--ema_decay`` / ``--ema_sigma_rel``,
``library.training.ema``) is saved beside each model as ``<name>-ema.<ext>`` and kept in the resumable state.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from library.training.outputs import remove_save
from library.models.arguments import FULL_MODEL_FORMATS, add_save_model_arguments
from library.models.weights import move_module
from library.training.recipes import Recipe, SaveInfo

DREAMBOOTH = "dreambooth"
FINE_TUNING = "fine_tuning"
EMA_SUFFIX = "-ema"
_EXTENSIONS = {"ckpt": "ckpt", "safetensors": "safetensors", "diffusers": "", "diffusers_safetensors": ""}
_EMA_PREFIX = "ema."


def add_full_weight_arguments(parser: argparse.ArgumentParser, style: str) -> None:
    """Options of train_db.py (``style=DREAMBOOTH``) or fine_tune.py (``FINE_TUNING``), sd-scripts names, plus
    ``--save_model_as`` / ``--save_precision`` and the EMA options. Add before the shared training options."""
    from library.training.ema import add_ema_arguments

    add_save_model_arguments(parser, FULL_MODEL_FORMATS, default=None)
    g = parser.add_argument_group("full-weight training")
    g.add_argument("--use_safetensors", action="store_true",
                   help="without --save_model_as: save in the base model's layout with safetensors weights")
    g.add_argument("--learning_rate_te", type=float, default=None,
                   help="learning rate of the text encoder (default: --learning_rate)")
    if style == DREAMBOOTH:
        g.add_argument("--stop_text_encoder_training", type=int, default=None,
                       help="freeze the text encoder from this optimizer step on (-1: never train it; default: "
                            "train it for the whole run)")
        g.add_argument("--no_token_padding", action="store_true",
                       help="condition on the tokens of the longest caption of the batch instead of all 77 "
                            "positions (as the original diffusers DreamBooth)")
    else:
        g.add_argument("--train_text_encoder", action="store_true", help="train the text encoder too")
        g.add_argument("--diffusers_xformers", action="store_true", help="same as --xformers (accepted for "
                                                                         "compatibility)")
    add_ema_arguments(parser)


def default_save_format(args: argparse.Namespace) -> str:
    """``--save_model_as``, else the base model's own layout (as sd-scripts): a ``.ckpt`` file gives ``ckpt``
    (``safetensors`` with ``--use_safetensors``), a ``.safetensors`` file ``safetensors``, a diffusers folder
    ``diffusers`` or ``diffusers_safetensors`` after the files it holds (or ``--use_safetensors``)."""
    if args.save_model_as:
        return args.save_model_as
    source = Path(args.pretrained_model_name_or_path or "")
    use_safetensors = bool(getattr(args, "use_safetensors", False))
    if source.suffix.lower() in (".ckpt", ".pt", ".bin"):
        return "safetensors" if use_safetensors else "ckpt"
    if source.suffix.lower() == ".safetensors":
        return "safetensors"
    if use_safetensors or (source.is_dir() and any(source.glob("unet/*.safetensors"))):
        return "diffusers_safetensors"
    return "diffusers"


def ema_path(path: Path) -> Path:
    """Where the EMA model of the model saved at ``path`` goes: ``<stem>-ema<suffix>`` beside it."""
    if path.suffix in (".safetensors", ".ckpt"):
        return path.with_name(f"{path.stem}{EMA_SUFFIX}{path.suffix}")
    return path.with_name(f"{path.name}{EMA_SUFFIX}")


class FullWeightRecipe(Recipe):
    """Train the UNet (always) and the text encoder (per the style's options); save whole models."""

    def __init__(self, args: argparse.Namespace, style: str):
        if style not in (DREAMBOOTH, FINE_TUNING):
            raise ValueError(f"unknown full-weight style {style!r}")
        self.style = style
        self.name = style
        if style == DREAMBOOTH:
            stop = args.stop_text_encoder_training
            self.train_te = stop is None or stop > 0
            self.stop_te_at = stop if stop is not None and stop > 0 else None
        else:
            self.train_te = bool(args.train_text_encoder)
            self.stop_te_at = None
        self.save_format = default_save_format(args)
        self.file_extension = _EXTENSIONS[self.save_format]
        self.no_token_padding = bool(getattr(args, "no_token_padding", False))
        self.models: Any = None
        self.ema: Any = None
        self._te_frozen = False

    # ------------------------------------------------------------------ options

    def option_problems(self, args: argparse.Namespace) -> list[str]:
        from library.errors import UserError
        from library.training.ema import validate_ema_args

        problems: list[str] = []
        try:
            validate_ema_args(args)
        except UserError as err:
            problems.append(err.message)
        if args.learning_rate_te is not None and not self.train_te:
            hint = ("--stop_text_encoder_training is -1 or 0" if self.style == DREAMBOOTH
                    else "add --train_text_encoder")
            problems.append(f"--learning_rate_te {args.learning_rate_te} is given but the text encoder does not "
                            f"train ({hint})")
        if self.train_te and (args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk):
            fix = ("--stop_text_encoder_training -1" if self.style == DREAMBOOTH
                   else "drop --train_text_encoder")
            problems.append(f"--cache_text_encoder_outputs needs a frozen text encoder, but it trains here: use "
                            f"{fix}, or remove the caching option")
        if self.no_token_padding and args.max_token_length not in (None, 75):
            problems.append(f"--no_token_padding works with 75-token captions only, not --max_token_length "
                            f"{args.max_token_length}: remove one of the two")
        problems += fused_backward_problems(args)
        return problems

    def trains_text_encoder(self) -> bool:
        return self.train_te

    def trained_base_modules(self) -> set[str]:
        return {"unet", "text_encoder"} if self.train_te else {"unet"}

    def text_encoder_trains_at(self, global_step: int) -> bool:
        """True before the stop step; the encoder's parameters stop requiring gradients from then on, so no
        process all-reduces or steps them (their optimizer state stays as it was)."""
        trains = self.train_te and (self.stop_te_at is None or global_step < self.stop_te_at)
        if self.train_te and self._te_frozen == trains:
            self._te_frozen = not trains
            for te in self.models.text_encoders:
                te.requires_grad_(trains)
        return trains

    # ------------------------------------------------------------------ modules

    def setup(self, models: Any, args: argparse.Namespace, device: torch.device) -> None:
        self.models = models
        models.unet.requires_grad_(True)
        for te in models.text_encoders:
            te.requires_grad_(self.train_te)

    def _modules(self) -> list[tuple[str, torch.nn.Module]]:
        modules = [("unet", self.models.unet)]
        if self.train_te:
            modules += [(f"text_encoder{i or ''}", te) for i, te in enumerate(self.models.text_encoders)]
        return modules

    def param_groups(self, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
        groups = [{"params": list(self.models.unet.parameters()), "lr": args.learning_rate}]
        names = ["unet"]
        if self.train_te:
            te_params = [p for te in self.models.text_encoders for p in te.parameters()]
            te_lr = args.learning_rate_te if args.learning_rate_te is not None else args.learning_rate
            groups.append({"params": te_params, "lr": te_lr})
            names.append("textencoder")
        self._ensure_ema(args)
        return groups, names

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, module in self._modules() for p in module.parameters()]

    def train_mode(self, training: bool) -> None:
        self.models.unet.train(training)
        for te in self.models.text_encoders:
            te.train(training and self.train_te and not self._te_frozen)

    def cast_trained(self, dtype: torch.dtype) -> None:
        for _, module in self._modules():
            move_module(module, dtype=dtype)

    # ------------------------------------------------------------------ EMA

    def _ensure_ema(self, args: argparse.Namespace) -> None:
        """Created once the trained modules sit on their device in float32 (the first call of the loop's
        setup that comes after the move), from the weights training starts with."""
        if self.ema is None:
            from library.training.ema import ema_from_args

            self.ema = ema_from_args(self.trainable_parameters(), args)

    def after_optimizer_step(self, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
        if self.ema is None:
            return {}
        self.ema.update(self.ema.last_step + 1)
        return {}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, torch.Tensor]:
        weights = {f"{name}.{k}": v for name, module in self._modules() for k, v in module.state_dict().items()}
        if self.ema is not None:
            state = self.ema.state_dict()
            for i, tensor in enumerate(state["shadow"]):
                weights[f"{_EMA_PREFIX}shadow.{i}"] = tensor
            weights[f"{_EMA_PREFIX}last_step"] = torch.tensor(state["last_step"], dtype=torch.int64)
            for key in ("decay", "sigma_rel"):
                value = state[key]
                weights[f"{_EMA_PREFIX}{key}"] = torch.tensor(float("nan") if value is None else value,
                                                              dtype=torch.float64)
        return weights

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        from library.errors import UserError

        modules = dict(self._modules())
        by_module: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
        ema: dict[str, torch.Tensor] = {}
        unknown = []
        for key, value in weights.items():
            head, _, rest = key.partition(".")
            if key.startswith(_EMA_PREFIX):
                ema[key[len(_EMA_PREFIX):]] = value
            elif head in by_module:
                by_module[head][rest] = value
            else:
                unknown.append(key)
        if unknown:
            raise UserError(f"the resumed state holds weights this run does not train (e.g. {unknown[0]}): resume "
                            "with the same text encoder options (--train_text_encoder / "
                            "--stop_text_encoder_training) as the saved run")
        for name, module in modules.items():
            if not by_module[name]:
                raise UserError(f"the resumed state has no {name} weights: it was saved by a run that did not train "
                                f"the {name}; resume with the same options as that run")
            with torch.no_grad():
                module.load_state_dict(by_module[name], strict=True)
        if (self.ema is not None) != bool(ema):
            raise UserError("the resumed state and this run disagree about EMA (--ema_decay / --ema_sigma_rel): "
                            "resume with the EMA options of the saved run")
        if self.ema is not None:
            shadow = [ema[f"shadow.{i}"] for i in range(sum(1 for k in ema if k.startswith("shadow.")))]
            state = {"shadow": shadow, "last_step": int(ema["last_step"])}
            for key in ("decay", "sigma_rel"):
                value = float(ema[key])
                state[key] = None if value != value else value
            self.ema.load_state_dict(state)

    # ------------------------------------------------------------------ saving

    def save(self, path: Path, info: SaveInfo, args: argparse.Namespace) -> None:
        self._write(path, info, args)
        if self.ema is not None:
            kind = f"decay={self.ema.decay}" if self.ema.decay is not None else f"sigma_rel={self.ema.sigma_rel}"
            ema_info = SaveInfo(info.global_step, info.epoch, {**info.metadata, "ss_ema": kind})
            with self.ema.average_parameters():
                self._write(ema_path(path), ema_info, args)
            if args.save_last_n_epochs or args.save_last_n_steps:
                remove_orphaned_ema_files(path.parent, args.output_name or "last", self.file_extension)

    def _write(self, path: Path, info: SaveInfo, args: argparse.Namespace) -> None:
        from library.models.saving import save_dtype

        dtype = save_dtype(args.save_precision) or next(self.models.unet.parameters()).dtype
        self.models.family.spec.save(path, self.models, fmt=self.save_format, dtype=dtype,
                                     metadata=info.metadata or None, epoch=info.epoch, global_step=info.global_step)

    def metadata(self, args: argparse.Namespace) -> dict[str, str]:
        return {"ss_training_style": self.style, "ss_text_encoder_trained": str(self.train_te)}

    def text_conditioning(self, text: Any) -> Any:
        return LongestCaptionText(text) if self.no_token_padding else text


class LongestCaptionText:
    """``--no_token_padding``: the conditioning ends after the longest caption of the batch (its EOS) instead
    of spanning all 77 positions. CLIP's attention is causal, so the kept positions are exactly what an
    unpadded encoding gives; cached encoder outputs stay valid."""

    def __init__(self, text: Any):
        self.text = text

    def __call__(self, captions: list[str], device: torch.device) -> torch.Tensor:
        context = self.text(captions, device)
        encoding = self.text.encoding
        ids = (encoding.tokenize_weighted(captions)[0] if self.text.weighted else encoding.tokenize(captions))[:, 0]
        length = max(int((row == encoding.eos).nonzero()[0]) + 1 for row in ids)
        return context[:, :length]


def remove_orphaned_ema_files(folder: Path, name: str, ext: str) -> list[Path]:
    """Delete ``<name>-<epoch|step>-ema`` saves whose model was pruned (``--save_last_n_*``)."""
    suffix = f".{ext}" if ext else ""
    pattern = re.compile(rf"^{re.escape(name)}-(\d{{6}}|step\d{{8}}){re.escape(EMA_SUFFIX + suffix)}$")
    removed = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = pattern.match(path.name)
        if m and not (folder / f"{name}-{m.group(1)}{suffix}").exists():
            remove_save(path)
            removed.append(path)
    return removed


def fused_backward_problems(args: argparse.Namespace) -> list[str]:
    """What ``--fused_backward_pass`` cannot be combined with (the optimizer checks its own part)."""
    if not getattr(args, "fused_backward_pass", False):
        return []
    problems = []
    if args.mixed_precision == "fp16":
        problems.append("--fused_backward_pass cannot be used with --mixed_precision fp16: fp16 loss scaling needs "
                        "every gradient before any weight changes; use --mixed_precision bf16 (or no)")
    return problems


def full_model_metadata(run: Any) -> dict[str, str]:
    """``modelspec.*`` keys of the saved single-file models, and what the run trained."""
    from library.models.metadata import run_modelspec

    args, family = run.args, run.models.family
    resolution = run.params.datasets[0].resolution if run.params.datasets else family.default_resolution
    meta = run_modelspec(family, args, title=run.names.name, resolution=resolution, lora=False)
    meta.update(run.recipe.metadata(args))
    meta["ss_seed"] = str(run.seed)
    if args.training_comment:
        meta["ss_training_comment"] = args.training_comment
    return meta


def uses_prepared_latents(args: argparse.Namespace) -> bool:
    """An ``--in_json`` written by prepare_buckets_latents.py (entries with ``train_resolution``) and no latent
    caching option: sd-scripts' fine_tune.py then reads the prepared ``.npz`` files, which needs
    ``--cache_latents_to_disk`` here (unless an augmentation changes the images every step)."""
    import json

    if not getattr(args, "in_json", None) or args.dataset_config or args.cache_latents or args.cache_latents_to_disk:
        return False
    if args.color_aug or args.random_crop or args.face_crop_aug_range:
        return False
    try:
        entries = json.loads(Path(args.in_json).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # the dataset layer reports unreadable metadata
    return isinstance(entries, dict) and any(isinstance(e, dict) and "train_resolution" in e for e in entries.values())


def build_full_parser(prog: str, description: str, support: Any, style: str,
                      extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    """The parser of train_db.py / fine_tune.py / sdxl_train.py: the groups of train_network.py with the
    full-weight group (and a family's ``extra`` options) in place of the network options."""
    from library.training.parser import build_training_parser

    def add(parser: argparse.ArgumentParser) -> None:
        add_full_weight_arguments(parser, style)
        if extra is not None:
            extra(parser)

    return build_training_parser(prog=prog, description=description, support=support, add_recipe_arguments=add)


def run_full_training(parser: argparse.ArgumentParser, argv: list[str] | None, support: Any, style: str, *,
                      tracker_name: str, recipe_class: Callable[..., FullWeightRecipe] | None = None,
                      families: Sequence[str] = ("sd",), metadata: Callable[[Any], dict[str, str]] | None = None,
                      ) -> Path | None:
    """Parse ``argv`` (with ``--config_file``) and train; returns the final model's path. ``recipe_class(args,
    style)`` (default :class:`FullWeightRecipe`), ``families`` and ``metadata(run)`` (default
    :func:`full_model_metadata`) come from the script."""
    from library.config.run_config import load_run_config
    from library.training.loop import run_training

    args = load_run_config(parser, argv)
    if args is None:
        return None
    if getattr(args, "diffusers_xformers", False):
        args.xformers = True
    if style == FINE_TUNING and uses_prepared_latents(args):
        args.cache_latents_to_disk = True
        print(f"{args.in_json} comes from prepare_buckets_latents.py (it has train_resolution): its latents are "
              "used, as with --cache_latents_to_disk", flush=True)
    recipe = (recipe_class or FullWeightRecipe)(args, style)
    return run_training(args, recipe, support, tracker_name=tracker_name, metadata=metadata or full_model_metadata,
                        families=families)
