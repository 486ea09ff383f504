"""Textual inversion (train_textual_inversion.py, train_textual_inversion_XTI.py): the recipe that trains
only new token embeddings.

``--token_string tok --num_vectors_per_token 3`` adds ``tok``, ``tok1``, ``tok2`` to every tokenizer of the
model family; their rows start from ``--init_word``'s token embeddings (repeated or cut to the vector count,
as sd-scripts does) or from ``--weights``. In captions and sample prompts ``tok`` stands for all of them
(``tok tok1 tok2``). The rows are a separate parameter beside the frozen embedding matrix
(:mod:`library.models.embeddings`), so nothing else in the model can change. The text encoder runs with
gradients at every step (its outputs are never cached); the UNet, VAE and encoder weights stay frozen.

Files: ``{"emb_params": [n, dim]}`` for one text encoder (A1111 and diffusers' ``load_textual_inversion``
read it), one key per encoder (``clip_l``/``clip_g``) for two, one key per UNet cross-attention block for
XTI; safetensors files carry the ``modelspec.*`` metadata sd-scripts writes.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch

from library.config.arguments import SUPPORT_TRAIN_NETWORK
from library.errors import UserError
from library.models.embeddings import (SD_KEY, TrainedTokenEmbedding, install_block_contexts,
                                       install_trained_embedding, pool_at_first_eos, read_embedding_file,
                                       token_embedding, write_embedding_file)
from library.training.recipes import Recipe, SaveInfo

TI_FORMATS = ("ckpt", "pt", "safetensors")
SUPPORT_TEXTUAL_INVERSION = dataclasses.replace(SUPPORT_TRAIN_NETWORK, script="train_textual_inversion.py")
SUPPORT_XTI = dataclasses.replace(SUPPORT_TRAIN_NETWORK, script="train_textual_inversion_XTI.py")
SUPPORT_SDXL_TEXTUAL_INVERSION = dataclasses.replace(SUPPORT_TRAIN_NETWORK, script="sdxl_train_textual_inversion.py")

# The caption templates of the textual inversion paper (``{}`` is the token), as sd-scripts uses them.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)


def add_textual_inversion_arguments(parser: argparse.ArgumentParser) -> None:
    """sd-scripts' textual-inversion options (and ``--save_model_as`` ckpt|pt|safetensors, default pt)."""
    from library.models.arguments import add_save_model_arguments

    add_save_model_arguments(parser, TI_FORMATS, default="pt")
    g = parser.add_argument_group("textual inversion")
    g.add_argument("--token_string", type=str, default=None,
                   help="the new word trained (must not be in the tokenizer's vocabulary); captions and sample "
                        "prompts use it")
    g.add_argument("--init_word", type=str, default=None,
                   help="word(s) whose token embeddings start the new vectors (default: the vocabulary's mean)")
    g.add_argument("--num_vectors_per_token", type=int, default=1, help="vectors (tokens) behind --token_string")
    g.add_argument("--weights", type=str, default=None,
                   help="continue from an embedding file (ours, sd-scripts', diffusers' or A1111's)")
    g.add_argument("--use_object_template", action="store_true",
                   help="ignore the captions; train on 'a photo of a <token>' style templates")
    g.add_argument("--use_style_template", action="store_true",
                   help="ignore the captions; train on 'a painting in the style of <token>' templates")


def token_strings(token_string: str, count: int) -> list[str]:
    """``tok``, ``tok1``, ``tok2``, ... (``count`` tokens)."""
    return [token_string] + [f"{token_string}{i}" for i in range(1, count)]


def _early_tokenizers(args: argparse.Namespace, families: Sequence[str]) -> list[Any]:
    """The model's tokenizers when they can be read without loading the model (else none: the model loader
    then reports what is missing)."""
    from library.models.families import resolve_family

    source = Path(args.pretrained_model_name_or_path or "")
    model_dir = source if source.is_dir() else None
    try:
        family = resolve_family(args, families)
        return family.spec.load_tokenizers(family, model_dir=model_dir, cache_dir=args.tokenizer_cache_dir)
    except UserError:
        return []


def vocabulary_problems(tokenizers: Sequence[Any], tokens: Sequence[str], init_word: str | None) -> list[str]:
    """A new token already in a vocabulary; an ``--init_word`` that gives no tokens."""
    problems = []
    for i, tokenizer in enumerate(tokenizers):
        which = f"tokenizer {i + 1}" if len(tokenizers) > 1 else "the tokenizer"
        vocab = tokenizer.get_vocab()
        taken = [t for t in tokens if t in vocab]
        if taken:
            problems.append(f"--token_string: {', '.join(repr(t) for t in taken)} already in {which}'s vocabulary, "
                            "so it would not be a new word; choose a made-up string (e.g. 'sks1x')")
        if init_word is not None and not tokenizer.encode(init_word, add_special_tokens=False):
            problems.append(f"--init_word {init_word!r} gives no tokens with {which}: use a real word")
    return problems


class TextualInversionRecipe(Recipe):
    """Train ``num_vectors_per_token`` new token rows per text encoder (XTI: per UNet cross-attention block)."""

    def __init__(self, args: argparse.Namespace, *, xti: bool = False, families: Sequence[str] = ("sd",)):
        self.xti = xti
        self.families = tuple(families)
        self.name = "textual_inversion_xti" if xti else "textual_inversion"
        self.file_extension = args.save_model_as or "pt"
        self.token_string: str = args.token_string or ""
        self.count = max(int(args.num_vectors_per_token), 1)
        self.tokens = token_strings(self.token_string, self.count)
        self.template_option = ("--use_object_template" if args.use_object_template else
                                "--use_style_template" if args.use_style_template else None)
        templates = {"--use_object_template": OBJECT_TEMPLATES, "--use_style_template": STYLE_TEMPLATES}.get(
            self.template_option or "", ())
        self.templates = tuple(t.format(self.token_string) for t in templates)
        self.embeddings: list[TrainedTokenEmbedding] = []
        self.text_encoders: list[torch.nn.Module] = []
        self.block_names: list[str] = []
        self.file_keys: list[str] = []
        self.initial: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ options

    def option_problems(self, args: argparse.Namespace) -> list[str]:
        problems: list[str] = []
        if not args.token_string:
            problems.append("--token_string is required: the new word the embedding is trained for (e.g. "
                            "--token_string mychar); captions and sample prompts contain it")
        elif args.token_string.strip() != args.token_string or not args.token_string.strip():
            problems.append(f"--token_string {args.token_string!r}: no leading or trailing spaces")
        if args.num_vectors_per_token < 1:
            problems.append(f"--num_vectors_per_token must be >= 1 (got {args.num_vectors_per_token})")
        if args.use_object_template and args.use_style_template:
            problems.append("--use_object_template and --use_style_template exclude each other: choose one")
        if args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk:
            problems.append("--cache_text_encoder_outputs cannot be used for textual inversion: the embedding "
                            "trains, so the text encoder's outputs change every step; remove the option")
        if args.weights:
            try:
                self.initial = read_embedding_file(args.weights)
            except UserError as err:
                problems.append(err.message)
            if self.initial is not None:
                problems += self._weights_count_problems(args.weights)
        if args.token_string and not problems:
            problems += vocabulary_problems(_early_tokenizers(args, self.families), self.tokens, args.init_word)
        return problems

    def _weights_count_problems(self, path: str) -> list[str]:
        counts = {k: v.shape[0] for k, v in self.initial.items()}
        wrong = {k: c for k, c in counts.items() if c != self.count}
        if not wrong:
            return []
        first = next(iter(wrong.values()))
        listing = ", ".join(f"{k}: {c}" for k, c in counts.items())
        return [f"--weights {path}: it holds {first} vector(s) per token ({listing}), this run "
                f"--num_vectors_per_token {self.count}: use --num_vectors_per_token {first}"]

    def trains_text_encoder(self) -> bool:
        return True  # gradients flow through the encoder to the new rows; its outputs are never cached

    def trained_base_modules(self) -> set[str]:
        # the encoder stays float32 under mixed precision (as sd-scripts), so the rows' gradients are exact
        return {"text_encoder"}

    # ------------------------------------------------------------------ modules

    def setup(self, models: Any, args: argparse.Namespace, device: torch.device) -> None:
        self.text_encoders = list(models.text_encoders)
        if self.xti and len(self.text_encoders) > 1:
            raise UserError("XTI trains SD1.x/SD2.x models (one text encoder); use sdxl_train_textual_inversion.py "
                            "for SDXL")
        self.block_names = install_block_contexts(models.unet) if self.xti else []
        sets = max(len(self.block_names), 1)
        self.file_keys = self.block_names or ([SD_KEY] if len(self.text_encoders) == 1 else
                                              [f"clip_{n}" for n in ("l", "g")][: len(self.text_encoders)])
        for i, (tokenizer, te) in enumerate(zip(models.tokenizers, models.text_encoders)):
            ids = self._add_tokens(tokenizer, te, i)
            base = token_embedding(te).weight.detach()
            rows = self._initial_rows(tokenizer, base, args.init_word).repeat(sets, 1)
            if self.initial is not None:
                rows = self._rows_from_file(i, base.shape[1], args.weights)
            pool_at_first_eos(te, tokenizer.eos_token_id)
            embedding = install_trained_embedding(te, rows)
            embedding.trained.requires_grad_(True)
            self.embeddings.append(embedding)
            print(f"textual inversion: tokens {', '.join(self.tokens)} added as ids {ids[0]}..{ids[-1]}"
                  + (f", {sets} sets (XTI blocks {', '.join(self.block_names)})" if self.xti else ""), flush=True)

    def _add_tokens(self, tokenizer: Any, te: torch.nn.Module, index: int) -> list[int]:
        problems = vocabulary_problems([tokenizer], self.tokens, None)
        if problems:
            raise UserError(problems[0])
        vocab = token_embedding(te).weight.shape[0]
        if len(tokenizer) != vocab:
            raise UserError(f"tokenizer {index + 1} has {len(tokenizer)} tokens but its text encoder has {vocab} "
                            "embedding rows: the model's tokenizer and text encoder do not belong together")
        tokenizer.add_tokens(self.tokens)
        ids = tokenizer.convert_tokens_to_ids(self.tokens)
        if ids != list(range(vocab, vocab + self.count)):
            raise UserError(f"the tokenizer gave the new tokens the ids {ids}, expected {vocab}..; "
                            "choose another --token_string")
        return ids

    def _initial_rows(self, tokenizer: Any, base: torch.Tensor, init_word: str | None) -> torch.Tensor:
        if init_word is None:
            return base.float().mean(dim=0, keepdim=True).repeat(self.count, 1)
        ids = tokenizer.encode(init_word, add_special_tokens=False)
        if len(ids) > 1 and len(ids) != self.count:
            print(f"--init_word {init_word!r} has {len(ids)} tokens for {self.count} vectors: its tokens are "
                  "repeated or cut to fit", flush=True)
        return torch.stack([base[ids[k % len(ids)]].float() for k in range(self.count)])

    def _rows_from_file(self, index: int, dim: int, path: str) -> torch.Tensor:
        data = self.initial or {}
        if self.xti:
            missing = [k for k in self.file_keys if k not in data]
            if missing:
                raise UserError(f"--weights {path}: not an XTI file for this UNet: no {', '.join(missing[:4])} "
                                f"(it has {', '.join(list(data)[:6])}); XTI files have one key per cross-attention "
                                f"block: {', '.join(self.file_keys)}")
            rows = torch.cat([data[k] for k in self.file_keys])
        else:
            key = self.file_keys[index]
            if key in data:
                rows = data[key]
            elif len(data) == 1 and len(self.file_keys) == 1:
                rows = next(iter(data.values()))
            else:
                raise UserError(f"--weights {path}: no {key!r} embedding in it (it has {', '.join(data)})")
        if rows.shape[-1] != dim:
            raise UserError(f"--weights {path}: its vectors have {rows.shape[-1]} values, this model's text encoder "
                            f"{index + 1} takes {dim} (an embedding for another model family?)")
        return rows

    def prepare_dataset(self, group: Any) -> None:
        if self.templates:
            group.caption_templates = self.templates
            group.notes.append(f"captions replaced by {len(self.templates)} templates such as "
                               f"'{self.templates[0]}' ({self.template_option})")
            return
        group.notes.extend(captions_without_token(group, self.token_string))

    def param_groups(self, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
        return [{"params": self.trainable_parameters(), "lr": args.learning_rate}], ["embedding"]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [e.trained for e in self.embeddings]

    def train_mode(self, training: bool) -> None:
        for te in self.text_encoders:
            te.train(training)

    def cast_trained(self, dtype: torch.dtype) -> None:
        with torch.no_grad():
            for e in self.embeddings:
                e.trained.data = e.trained.data.to(dtype)

    def text_conditioning(self, text: Any) -> Any:
        return EmbeddingText(text, self.token_string, self.tokens, sets=max(len(self.block_names), 1),
                             vocab=self.embeddings[0].vocab if self.embeddings else 0)

    # ------------------------------------------------------------------ state and files

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"embedding{i}": e.trained for i, e in enumerate(self.embeddings)}

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        if weights.keys() != own.keys() or any(weights[k].shape != v.shape for k, v in own.items()):
            shapes = {k: tuple(v.shape) for k, v in weights.items()}
            raise UserError(f"the resumed state holds embeddings {shapes}, this run trains "
                            f"{ {k: tuple(v.shape) for k, v in own.items()} }: resume with the saved run's "
                            "--num_vectors_per_token (and the same script and model)")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(weights[k])

    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """What the embedding file holds: ``{key: [n, dim]}``."""
        if self.xti:
            rows = self.embeddings[0].trained.detach()
            tensors = {k: rows[s * self.count:(s + 1) * self.count] for s, k in enumerate(self.file_keys)}
        else:
            tensors = {k: e.trained.detach() for k, e in zip(self.file_keys, self.embeddings)}
        return {k: v.to("cpu", dtype or v.dtype).clone() for k, v in tensors.items()}

    def save(self, path: Path, info: SaveInfo, args: argparse.Namespace) -> None:
        from library.models.saving import save_dtype

        metadata = {k: v for k, v in info.metadata.items() if k.startswith("modelspec.")}
        write_embedding_file(path, self.file_tensors(save_dtype(args.save_precision)), metadata)


def captions_without_token(group: Any, token_string: str) -> list[str]:
    """Plan notes: training subsets whose captions (with prefix/suffix) lack the token string."""
    notes = []
    for ds in group.train:
        by_subset: dict[int, list[Any]] = {}
        totals: dict[int, int] = {}
        for img in ds.images:
            if img.is_reg:
                continue
            totals[img.subset_index] = totals.get(img.subset_index, 0) + 1
            sub = ds.subset_params[img.subset_index]
            text = f"{sub.caption_prefix or ''} {img.record.caption} {sub.caption_suffix or ''}"
            if token_string not in text:
                by_subset.setdefault(img.subset_index, []).append(img)
        for index, images in by_subset.items():
            sub = ds.subset_params[index]
            first = images[0].record
            notes.append(f"{sub.origin}: {len(images)} of {totals[index]} images have captions without the token "
                         f"string {token_string!r} (e.g. {first.path.name}: {first.caption!r}); they teach the "
                         "embedding nothing: add it to their captions (or caption_prefix), or use "
                         "--use_object_template / --use_style_template")
    return notes


class EmbeddingText:
    """The text conditioning of a textual-inversion run: the token string stands for all its tokens; with XTI
    the encoder runs on one copy of each caption per UNet block (the set's token ids) and the contexts are
    concatenated along the sequence for :class:`library.models.embeddings.BlockContextProcessor`."""

    def __init__(self, text: Any, token_string: str, tokens: Sequence[str], *, sets: int, vocab: int):
        self.text = text
        self.token_string = token_string
        self.replacement = " ".join(tokens) if len(tokens) > 1 else None
        self.count = len(tokens)
        self.sets = sets
        self.vocab = vocab

    def _replaced(self, captions: Sequence[str]) -> list[str]:
        if self.replacement is None:
            return list(captions)
        return [c.replace(self.token_string, self.replacement) for c in captions]

    def __call__(self, captions: list[str], device: torch.device) -> torch.Tensor:
        return self.encode(captions, device)

    def encode(self, captions: list[str], device: torch.device) -> torch.Tensor:
        captions = self._replaced(captions)
        if self.sets == 1:
            return self.text.encode(captions, device)
        encoding = self.text.encoding
        if self.text.weighted:
            ids, weights = encoding.tokenize_weighted(captions)
        else:
            ids, weights = encoding.tokenize(captions), None
        new = ids >= self.vocab
        stacked = torch.cat([torch.where(new, ids + s * self.count, ids) for s in range(self.sets)])
        repeated = weights.repeat(self.sets, 1, 1).to(device) if weights is not None else None
        hidden = encoding.encode(stacked.to(device), repeated)  # [sets * B, L, dim]
        batch = ids.shape[0]
        hidden = hidden.reshape(self.sets, batch, *hidden.shape[1:]).transpose(0, 1)
        return hidden.reshape(batch, self.sets * hidden.shape[2], hidden.shape[3])


def textual_inversion_metadata(run: Any) -> dict[str, str]:
    """The ``modelspec.*`` keys sd-scripts writes into embedding files (Stability AI's implementation)."""
    from library.models.metadata import run_modelspec

    family = run.models.family
    resolution = run.params.datasets[0].resolution if run.params.datasets else family.default_resolution
    meta = run_modelspec(family, run.args, title=run.names.name, resolution=resolution, lora=False)
    meta["modelspec.architecture"] = f"{family.modelspec_architecture}/textual-inversion"
    return meta


def build_textual_inversion_parser(prog: str, description: str, support: Any) -> argparse.ArgumentParser:
    from library.training.parser import build_training_parser

    return build_training_parser(prog=prog, description=description, support=support,
                                 add_recipe_arguments=add_textual_inversion_arguments)


def load_textual_inversion_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | None:
    """The parsed options (``--config_file`` applied); ``--output_name`` defaults to the token string, as in
    sd-scripts. None for ``--output_config``."""
    from library.config.run_config import load_run_config

    args = load_run_config(parser, argv)
    if args is not None and args.output_name is None and args.token_string:
        args.output_name = args.token_string
    return args


def run_textual_inversion(parser: argparse.ArgumentParser, argv: list[str] | None, support: Any, *,
                          xti: bool, families: Sequence[str] = ("sd",)) -> Path | None:
    """Parse ``argv`` (with ``--config_file``) and train; returns the final embedding file."""
    from library.training.loop import run_training

    args = load_textual_inversion_args(parser, argv)
    if args is None:
        return None
    recipe = TextualInversionRecipe(args, xti=xti, families=families)
    return run_training(args, recipe, support, tracker_name="textual_inversion",
                        metadata=textual_inversion_metadata, families=families)
