"""The weights the book ships (safetensors, sha256, model cards) and the one registry that loads them."""
