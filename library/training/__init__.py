"""Training building blocks: noise, losses, optimizers, schedulers, sampling, EMA (and the loop)."""
