"""Library side of the tool scripts (captioners, taggers, metadata tools)."""
