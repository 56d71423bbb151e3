"""Benchmarks: every method on one folder (``benchmark``), and a backbone's patch-kNN probe (``backbone_probe``)."""
