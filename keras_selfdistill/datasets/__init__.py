"""Real datasets without a download: bundled, or installed from a registry."""

from keras_selfdistill.datasets.fashion_mnist import load_fashion_mnist
from keras_selfdistill.datasets.handwritten_digits import load_digits
from keras_selfdistill.datasets.handwritten_digits import load_mnist
from keras_selfdistill.datasets.label_noise import add_label_noise
from keras_selfdistill.datasets.sources import load

__all__ = [
    "add_label_noise",
    "load",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
]
