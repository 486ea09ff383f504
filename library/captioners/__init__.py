"""Training and using image captioners (BLIP, Florence-2) with PEFT LoRA adapters."""
