from keras_selfdistill.datasets.fashion_mnist import load_fashion_mnist
from keras_selfdistill.datasets.handwritten_digits import load_mnist
from keras_selfdistill.datasets.label_noise import add_label_noise

NAMES = ("bundled_mnist", "fashion_mnist", "mnist")
# The first file tensorflow-datasets downloads for MNIST.
_DOWNLOAD_URL = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/"
    "train-images-idx3-ubyte.gz"
)


def _reachable(timeout):
    """Whether the MNIST download answers within `timeout` seconds.

    Asked as tensorflow-datasets downloads: an HTTP request with
    `requests`, which goes through `HTTPS_PROXY` (and honours `NO_PROXY`,
    `REQUESTS_CA_BUNDLE`) as its downloader does; any HTTP answer counts.
    """
    import requests

    try:
        with requests.head(_DOWNLOAD_URL, timeout=timeout):
            return True
    except requests.RequestException:
        return False


def _tfds_mnist(label_noise, seed, timeout):
    import tensorflow_datasets as tfds

    builder = tfds.builder("mnist")
    if not builder.is_prepared() and not _reachable(timeout):
        raise ConnectionError(
            "The full MNIST is not in the tensorflow-datasets folder and "
            f"{_DOWNLOAD_URL} did not answer within {timeout:g} s (through "
            "HTTPS_PROXY if one is set), so "
            "it cannot be downloaded here. Use 'bundled_mnist' (5,000 "
            "digits inside the package) or 'fashion_mnist' (from Debian's "
            "`dataset-fashion-mnist`), which need no network."
        )
    splits = tfds.as_numpy(
        tfds.load(
            "mnist", split=["train", "test"], as_supervised=True, batch_size=-1
        )
    )
    (x, y), (x_test, y_test) = (
        (images.astype("float32") / 255.0, labels.astype("int64"))
        for images, labels in splits
    )
    y = add_label_noise(y, label_noise, 10, seed)
    return (x, y), (x_test, y_test)


def load(name, label_noise=0.0, seed=0, fallback=None, timeout=10.0):
    """Loads a 28×28 image dataset by name, failing fast when offline.

    - `"bundled_mnist"`: the 5,000 MNIST digits inside the package
      (`load_mnist`); always works.
    - `"fashion_mnist"`: the full Fashion-MNIST from local files
      (`load_fashion_mnist`, Debian's `dataset-fashion-mnist`).
    - `"mnist"`: the full MNIST through tensorflow-datasets, which
      downloads it once. When it is not prepared yet and the download host
      does not answer within `timeout` seconds, this fails at once with a
      `ConnectionError` instead of hanging in retries.

    With `fallback`, a source that cannot be read (no network, files not
    installed) is replaced by that one, with a printed note: notebooks use
    `fallback="bundled_mnist"` so that they run anywhere.

    Args:
        name: One of `"bundled_mnist"`, `"fashion_mnist"`, `"mnist"`.
        label_noise: Fraction of training labels flipped to another class
            (test labels stay clean). Defaults to `0.0`.
        seed: Seed of the label noise. Defaults to `0`.
        fallback: A name to load instead when `name` cannot be read.
            Defaults to `None` (raise).
        timeout: Seconds to wait for the download host. Defaults to `10.0`.

    Returns:
        `((x_train, y_train), (x_test, y_test))`, float32 images of shape
        `(n, 28, 28, 1)` in [0, 1] and int64 labels.

    Example:

    ```python
    (x, y), (x_test, y_test) = keras_selfdistill.datasets.load(
        "mnist", fallback="bundled_mnist")
    ```
    """
    for value, argument in ((name, "name"), (fallback, "fallback")):
        if value is not None and value not in NAMES:
            raise ValueError(
                f"`{argument}` must be one of {NAMES}. "
                f"Received: {argument}={value!r}"
            )
    try:
        if name == "bundled_mnist":
            return load_mnist(label_noise, seed)
        if name == "fashion_mnist":
            return load_fashion_mnist(label_noise, seed)
        return _tfds_mnist(label_noise, seed, timeout)
    except (ConnectionError, FileNotFoundError) as error:
        if fallback is None or fallback == name:
            raise
        print(f"Using {fallback!r} instead of {name!r}: {error}")
        return load(fallback, label_noise, seed, timeout=timeout)
