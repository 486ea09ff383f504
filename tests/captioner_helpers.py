"""Tiny random-weight BLIP and Florence-2 models (built here, saved as ordinary model folders) and generated
image/caption pairs for the captioner tests."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
CAPTION_WORDS = ["a", "on", "white", "background", *COLOURS, *SHAPES]


def draw_shape(colour: str, shape: str, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (size // 6, size // 6, size * 5 // 6, size * 5 // 6)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image


def make_pairs(folder: Path, count: int = 12, extension: str = ".txt") -> list[tuple[Path, str]]:
    """``count`` images (colour x shape) with captions beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    combos = [(c, s) for c in COLOURS for s in SHAPES][:count]
    pairs = []
    for i, (colour, shape) in enumerate(combos):
        path = folder / f"{i:02d}_{colour}_{shape}.png"
        draw_shape(colour, shape).save(path)
        text = f"a {colour} {shape} on a white background"
        path.with_suffix(extension).write_text(text + "\n", encoding="utf-8")
        pairs.append((path, text))
    return pairs


def build_tiny_blip(folder: Path, seed: int = 0) -> Path:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *CAPTION_WORDS]
    vocab = {w: i for i, w in enumerate(words)}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]")
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, encoder_hidden_size=32, initializer_range=0.2,
                         max_position_embeddings=64, bos_token_id=vocab["[DEC]"], sep_token_id=vocab["[SEP]"],
                         pad_token_id=0, eos_token_id=vocab["[SEP]"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def build_tiny_florence2(folder: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import (BartConfig, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor,
                              PreTrainedTokenizerFast)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    prompt_words = "describe in detail what is shown the image . what does show".split()
    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>", *dict.fromkeys(prompt_words + CAPTION_WORDS)]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                           special_tokens=[("<s>", 1), ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>",
                                        extra_special_tokens={"image_token": "<image>"})
    text = BartConfig(vocab_size=len(vocab), d_model=32, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                      max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      decoder_start_token_id=2, forced_eos_token_id=2, init_std=0.2)
    vision = dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                  patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4],
                  window_size=2, projection_dim=32, drop_path_rate=0.0)
    config = Florence2Config(text_config=text.to_dict(), vision_config=vision, image_token_id=vocab["<image>"])
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False)
    image_processor.image_seq_length = 17
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
