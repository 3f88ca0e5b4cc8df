"""Small real datasets that ship with the package (no download)."""

from keras_selfdistill.datasets.handwritten_digits import load_digits
from keras_selfdistill.datasets.handwritten_digits import load_mnist
from keras_selfdistill.datasets.label_noise import add_label_noise

__all__ = ["add_label_noise", "load_digits", "load_mnist"]
