"""Textual-inversion embeddings: new token rows trained beside a frozen CLIP token embedding, their files,
and XTI's per-block conditioning of the UNet.

The new tokens get ids after the tokenizer's vocabulary (``V``, ``V+1``, ...). :class:`TrainedTokenEmbedding`
replaces the text encoder's ``token_embedding``: ids below ``V`` read the original (frozen, never written)
matrix, ids from ``V`` on read the trained rows, a separate parameter. So every original row stays
bit-identical by construction, and only the new rows get gradients and optimizer state.

XTI (P+) trains one set of rows per UNet cross-attention block: set ``s`` is addressed by the ids
``V + s*n ... V + s*n + n-1`` (``n`` vectors per token), the text encoder runs once on the ``S`` shifted copies
of each caption, and the ``S`` contexts travel to the UNet concatenated along the sequence; each
cross-attention block takes its own slice (:class:`BlockContextProcessor`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from library.errors import UserError

SD_KEY = "emb_params"
A1111_KEY = "string_to_param"


class TrainedTokenEmbedding(torch.nn.Module):
    """A frozen ``nn.Embedding`` (``base``) extended by ``trained`` rows for the ids ``>= base.num_embeddings``."""

    def __init__(self, base: torch.nn.Embedding, rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.vocab = base.num_embeddings
        self.trained = torch.nn.Parameter(rows.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:
        """The original matrix (what transformers reads as the input embeddings' weight)."""
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(max=self.vocab - 1))
        extra = F.embedding((input_ids - self.vocab).clamp(min=0, max=self.trained.shape[0] - 1),
                            self.trained.to(out.dtype))
        return torch.where((input_ids >= self.vocab).unsqueeze(-1), extra, out)


def token_embedding(text_encoder: torch.nn.Module) -> Any:
    """The text encoder's token embedding module (CLIPTextModel and CLIPTextModelWithProjection; transformers 5
    has no ``text_model`` level)."""
    return _embeddings(text_encoder).token_embedding


def _embeddings(text_encoder: torch.nn.Module) -> Any:
    return getattr(text_encoder, "text_model", text_encoder).embeddings


def install_trained_embedding(text_encoder: torch.nn.Module, rows: torch.Tensor) -> TrainedTokenEmbedding:
    """Put a :class:`TrainedTokenEmbedding` with ``rows`` in place of the encoder's token embedding."""
    embeddings = _embeddings(text_encoder)
    if isinstance(embeddings.token_embedding, TrainedTokenEmbedding):
        raise ValueError("the text encoder already has trained token rows")
    module = TrainedTokenEmbedding(embeddings.token_embedding, rows)
    module.to(embeddings.token_embedding.weight.device)
    embeddings.token_embedding = module
    return module


def pool_at_first_eos(text_encoder: torch.nn.Module, eos_token_id: int) -> None:
    """Make the pooled output (SDXL's second encoder) come from the first EOS. A config with the legacy
    ``eos_token_id`` 2 (e.g. SDXL's) makes transformers pool at the largest token id, which is a new token
    once tokens are added; for captions without new tokens both give the same position."""
    model = getattr(text_encoder, "text_model", text_encoder)
    if getattr(model, "eos_token_id", None) == 2:
        model.eos_token_id = eos_token_id


# ---------------------------------------------------------------------------------------------- XTI blocks


def cross_attention_blocks(unet: torch.nn.Module) -> list[tuple[str, list[Any]]]:
    """The UNet's cross-attention blocks in input, middle, output order, named as the original SD layout
    numbers them (``IN01`` ... ``MID`` ... ``OUT11`` for SD1/SD2, as XTI files name them), each with its
    cross-attention (``attn2``) modules."""
    layers = unet.config.layers_per_block
    blocks: list[tuple[str, list[Any]]] = []

    def attn2(module: torch.nn.Module) -> list[Any]:
        return [m for name, m in module.named_modules() if name.endswith("attn2")]

    for i, down in enumerate(unet.down_blocks):
        for j, attention in enumerate(getattr(down, "attentions", None) or []):
            blocks.append((f"IN{1 + i * (layers + 1) + j:02d}", attn2(attention)))
    for attention in getattr(unet.mid_block, "attentions", None) or []:
        blocks.append(("MID", attn2(attention)))
    for i, up in enumerate(unet.up_blocks):
        for j, attention in enumerate(getattr(up, "attentions", None) or []):
            blocks.append((f"OUT{i * (layers + 1) + j:02d}", attn2(attention)))
    return [(name, modules) for name, modules in blocks if modules]


class BlockContextProcessor:
    """Wraps an attention processor: cross-attention gets slice ``index`` of ``count`` equal slices of the
    context (XTI's per-block conditioning); self-attention is unchanged."""

    def __init__(self, inner: Any, index: int, count: int):
        self.inner = inner
        self.index = index
        self.count = count

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is not None:
            length = encoder_hidden_states.shape[1] // self.count
            encoder_hidden_states = encoder_hidden_states[:, self.index * length:(self.index + 1) * length]
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def install_block_contexts(unet: torch.nn.Module) -> list[str]:
    """Make each cross-attention block of ``unet`` read its own slice of the context; returns block names."""
    blocks = cross_attention_blocks(unet)
    for index, (_, modules) in enumerate(blocks):
        for module in modules:
            module.set_processor(BlockContextProcessor(module.processor, index, len(blocks)))
    return [name for name, _ in blocks]


# ---------------------------------------------------------------------------------------------- files


def _read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError) as err:
            raise UserError(f"--weights {path}: not a readable safetensors file ({err})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged or unsafe pickles
        raise UserError(f"--weights {path}: cannot read it as an embedding file (.pt/.ckpt/.bin loaded with "
                        f"weights_only=True; {str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--weights {path}: an embedding file holds a dict of tensors, this holds a "
                        f"{type(data).__name__}")
    return data, {}


def read_embedding_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an embedding file, each ``[n_vectors, dim]``: sd-scripts/diffusers files
    (``emb_params``, a single tensor, SDXL's ``clip_l``/``clip_g``, XTI's per-block keys) and A1111 files
    (``string_to_param``, one entry), as ``.safetensors`` or ``.pt``/``.ckpt``/``.bin``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights {path}: file not found")
    data, _ = _read(path)
    if A1111_KEY in data:
        params = data[A1111_KEY]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise UserError(f"--weights {path}: its string_to_param should hold one embedding, it holds "
                            f"{len(params) if isinstance(params, dict) else type(params).__name__}")
        data = {SD_KEY: next(iter(params.values()))}
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"--weights {path}: no tensors in it (keys: {', '.join(map(str, data))})")
    bad = [k for k, v in tensors.items() if v.ndim not in (1, 2) or not torch.isfinite(v.float()).all()]
    if bad:
        raise UserError(f"--weights {path}: {bad[0]!r} is not an embedding (a [vectors, dim] tensor of finite "
                        "values); the file is damaged or not a textual-inversion embedding")
    return {k: (v.unsqueeze(0) if v.ndim == 1 else v).detach().float() for k, v in tensors.items()}


def write_embedding_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    """Write atomically: safetensors with ``metadata`` (and the ``sshs_*`` hashes); ``.pt``/``.ckpt`` as a
    plain ``torch.save`` dict, which A1111 and diffusers read."""
    from library.io_utils import atomic_save_file
    from library.models.metadata import save_safetensors

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        save_safetensors(path, tensors, metadata or {})
    else:
        atomic_save_file(path, lambda tmp: torch.save(tensors, tmp))
