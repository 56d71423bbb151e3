"""Methods: one module (or small package) per method of the book, each built on ``methods.base``'s detector
protocol where it scores images."""
