"""AA-CLIP (Ma et al., CVPR 2025): ``adapters`` (the model), ``losses``, ``training`` (its two stages) and
``scoring`` (anomaly maps and image scores)."""
