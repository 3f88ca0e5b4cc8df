import gzip
import os

import numpy as np

from keras_selfdistill.datasets.label_noise import add_label_noise

DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
INSTALL_HINT = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian "
    f"and Ubuntu put the four files in {DEFAULT_PATH}), or download "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
    "https://github.com/zalandoresearch/fashion-mnist into a folder and "
    "pass that folder as `path`."
)


def _read_idx(filename, magic):
    with gzip.open(filename, "rb") as file:
        content = file.read()
    header = np.frombuffer(content[:4], dtype=">i4")[0]
    if header != magic:
        raise ValueError(
            f"{filename} is not an IDX file of the expected kind: its magic "
            f"number is {header}, expected {magic}."
        )
    rank = magic & 0xFF
    shape = tuple(np.frombuffer(content[4 : 4 + 4 * rank], dtype=">i4"))
    data = np.frombuffer(content, dtype="uint8", offset=4 + 4 * rank)
    if data.size != int(np.prod(shape)):
        raise ValueError(
            f"{filename} is truncated: its header announces shape {shape} "
            f"({int(np.prod(shape))} bytes), it holds {data.size}."
        )
    return data.reshape(shape)


def read_split(split, path=None):
    """Reads one split's raw uint8 images `(n, 28, 28)` and labels `(n,)`."""
    path = DEFAULT_PATH if path is None else os.fspath(path)
    images_file, labels_file = (os.path.join(path, f) for f in FILES[split])
    missing = [f for f in (images_file, labels_file) if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed: {', '.join(missing)} not "
            f"found. {INSTALL_HINT} Received: path={path!r}"
        )
    images = _read_idx(images_file, 0x0803)
    labels = _read_idx(labels_file, 0x0801)
    if len(images) != len(labels):
        raise ValueError(
            f"{images_file} holds {len(images)} images but {labels_file} "
            f"holds {len(labels)} labels."
        )
    return images, labels


def load_fashion_mnist(label_noise=0.0, seed=0, path=None):
    """The full Fashion-MNIST (60,000 / 10,000 images), read from disk.

    Nothing downloads: the four IDX files come from Debian's
    `dataset-fashion-mnist` package (`sudo apt-get install
    dataset-fashion-mnist`) or any folder holding them; a missing file is a
    `FileNotFoundError` that says how to install it. Test labels are always
    clean; `label_noise` corrupts the training labels only (see
    `add_label_noise`).

    Fashion-MNIST is by Han Xiao, Kashif Rasul and Roland Vollgraf
    (Zalando SE, 2017), MIT licence.

    Args:
        label_noise: Fraction of training labels flipped to another class.
            Defaults to `0.0`.
        seed: Seed of the label noise. Defaults to `0`.
        path: Folder holding the four `.gz` IDX files. Defaults to
            `"/usr/share/datasets/fashion-mnist"`.

    Returns:
        `((x_train, y_train), (x_test, y_test))`, float32 images of shape
        `(n, 28, 28, 1)` scaled to [0, 1] and int64 labels.

    Example:

    ```python
    (x_train, y_train), (x_test, y_test) = (
        keras_selfdistill.datasets.load_fashion_mnist(label_noise=0.4))
    ```
    """
    splits = []
    for split in ("train", "test"):
        images, labels = read_split(split, path)
        x = (images.astype("float32") / 255.0)[..., None]
        splits.append((x, labels.astype("int64")))
    (x_train, y_train), test = splits
    y_train = add_label_noise(y_train, label_noise, 10, seed)
    return (x_train, y_train), test
