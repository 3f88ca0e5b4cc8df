from keras_selfdistill.datasets import handwritten_digits
from keras_selfdistill.datasets.builders._bundled import Bundled


class BundledDigits(Bundled):
    """The 1,797 UCI 8×8 digits bundled with the package, as a tfds dataset.

    The split of `keras_selfdistill.datasets.load_digits`: 1,347 `"train"`
    and 450 `"test"` images, 8×8×1 uint8 with the source's pixel values
    0–16 (divide by 16 to scale them to [0, 1]). Preparing it reads the
    package's own file; nothing downloads. By E. Alpaydin and C. Kaynak,
    UCI Machine Learning Repository, CC BY 4.0.

    Example:

    ```python
    import tensorflow_datasets as tfds
    import keras_selfdistill.datasets.builders  # noqa: F401

    train = tfds.load("bundled_digits", split="train", as_supervised=True)
    ```
    """

    FILENAME = handwritten_digits.DIGITS_FILE
    TEST_SIZE = 450
    SHAPE = (8, 8, 1)
    DESCRIPTION = (
        "1,797 UCI optical handwritten digits, 8x8, values 0-16, split "
        "1,347 / 450."
    )
    HOMEPAGE = "https://doi.org/10.24432/C50P49"
    CITATION = (
        "@misc{alpaydin1998digits, title={Optical Recognition of Handwritten"
        " Digits}, author={Alpaydin, E. and Kaynak, C.}, year={1998}, "
        "howpublished={UCI Machine Learning Repository}}"
    )
    LICENSE = "CC BY 4.0"
