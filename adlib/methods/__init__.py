"""Methods: one module (or small package) per method of the book. Those that score images build on one of the three
kinds of detector of ``methods.base`` (memory bank, trained, zero-shot)."""
