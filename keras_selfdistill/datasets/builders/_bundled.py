import tensorflow_datasets as tfds

from keras_selfdistill.datasets import handwritten_digits


class Bundled(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder for one of the `.npz` files inside the package."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    FILENAME = None
    TEST_SIZE = None
    SHAPE = None
    DESCRIPTION = None
    HOMEPAGE = None
    CITATION = None
    LICENSE = None

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=self.SHAPE),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            license=self.LICENSE,
        )

    def _split_generators(self, dl_manager):
        splits = handwritten_digits.read_bundled(self.FILENAME, self.TEST_SIZE)
        return {
            name: self._generate_examples(*arrays)
            for name, arrays in splits.items()
        }

    def _generate_examples(self, images, labels):
        return examples(images, labels)


def examples(images, labels):
    """`(key, example)` pairs of `(n, height, width)` uint8 images."""
    for index, (image, label) in enumerate(zip(images, labels)):
        yield index, {"image": image[..., None], "label": int(label)}
