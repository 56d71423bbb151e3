"""Data: MVTec-format folders, one-class splits, the book's generated worlds (SynthTex, the toy caption world,
fractals) and downloads."""
