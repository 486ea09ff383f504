"""Lumina Image 2.0 (Next-DiT): weights conversion, Gemma2, loading, text conditioning, tiny test models."""
