"""Model loading, conversion, tokenizers, text encoding and saving."""
