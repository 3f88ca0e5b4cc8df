import tensorflow_datasets as tfds

from keras_selfdistill.datasets import fashion_mnist
from keras_selfdistill.datasets.builders import _bundled

_CLASSES = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]


class LocalFashionMnist(tfds.core.GeneratorBasedBuilder):
    """The full Fashion-MNIST from local files, as a tfds dataset.

    60,000 `"train"` and 10,000 `"test"` images, 28×28×1 uint8, the same
    records as tfds's own `fashion_mnist`, read from the four IDX files that
    Debian's `dataset-fashion-mnist` package installs in
    `/usr/share/datasets/fashion-mnist`, or from the manual directory
    (`download_config=tfds.download.DownloadConfig(manual_dir=...)`) when
    it holds them. Nothing downloads; a missing file is a
    `FileNotFoundError` that says how to install it.

    Fashion-MNIST is by Han Xiao, Kashif Rasul and Roland Vollgraf
    (Zalando SE, 2017), MIT licence.

    Example:

    ```python
    import tensorflow_datasets as tfds
    import keras_selfdistill.datasets.builders  # noqa: F401

    (train, test), info = tfds.load(
        "local_fashion_mnist", split=["train", "test"], as_supervised=True,
        with_info=True)
    info.splits["train"].num_examples  # 60000
    ```
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = fashion_mnist.INSTALL_HINT

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST: 70,000 28x28 grayscale images of "
            "Zalando articles in 10 classes.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(names=_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            citation=(
                "@article{xiao2017fashion, title={Fashion-MNIST: a Novel "
                "Image Dataset for Benchmarking Machine Learning "
                "Algorithms}, author={Xiao, Han and Rasul, Kashif and "
                "Vollgraf, Roland}, journal={arXiv:1708.07747}, "
                "year={2017}}"
            ),
            license="MIT",
        )

    def _split_generators(self, dl_manager):
        path = _source_folder(dl_manager)
        return {
            split: self._generate_examples(
                *fashion_mnist.read_split(split, path)
            )
            for split in ("train", "test")
        }

    def _generate_examples(self, images, labels):
        return _bundled.examples(images, labels)


def _source_folder(dl_manager):
    """The manual directory when it holds the files, else Debian's folder."""
    try:
        folder = dl_manager.manual_dir
    except AssertionError:
        return fashion_mnist.DEFAULT_PATH
    if (folder / fashion_mnist.FILES["train"][0]).exists():
        return str(folder)
    return fashion_mnist.DEFAULT_PATH
