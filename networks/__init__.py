"""Trainable networks loaded with ``--network_module`` (kohya-style module interface)."""
