"""Library side of the LoRA utilities in ``networks/`` (merge, SVD merge, resize, extract, check).

``lora_file`` reads and writes kohya-format files (and the spellings other tools write), ``lowrank`` holds the
SVD math, ``targets`` connects LoRA module names to the weights of a model family, and one module per tool
holds what the thin scripts call.
"""
