"""Training: the one loop every trained model of the book goes through (``adlib.training.loop``)."""
