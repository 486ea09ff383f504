"""Library side of the standalone tools: post-hoc EMA, metadata tools, latent preparation and captioners."""
