"""Shared code of the training scripts: configuration, datasets, models and the training loop."""
