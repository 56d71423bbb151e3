"""Data: the one image type (``imageset.ImageSet``), MVTec-format folders, one-class vector splits, the book's
generated worlds (SynthTex, the toy caption world, fractals) and downloads."""
