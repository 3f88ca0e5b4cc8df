import gzip
import os
import struct

import numpy as np
import pytest
from absl.testing import parameterized

from keras_selfdistill import datasets
from keras_selfdistill.datasets import fashion_mnist


def write_idx(folder, split, images, labels):
    """Writes one split as the four-byte-magic IDX files of Fashion-MNIST."""
    images_file, labels_file = fashion_mnist.FILES[split]
    with gzip.open(os.path.join(folder, images_file), "wb") as file:
        file.write(struct.pack(">iiii", 0x0803, *images.shape))
        file.write(images.astype("uint8").tobytes())
    with gzip.open(os.path.join(folder, labels_file), "wb") as file:
        file.write(struct.pack(">ii", 0x0801, len(labels)))
        file.write(labels.astype("uint8").tobytes())


def fake_fashion_mnist(folder, train_size=20, test_size=7):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, size in (("train", train_size), ("test", test_size)):
        images = rng.integers(0, 256, (size, 28, 28), dtype="uint8")
        labels = np.arange(size) % 10
        write_idx(folder, split, images, labels)
        arrays[split] = (images, labels)
    return arrays


class LoadFashionMnistTest(parameterized.TestCase):
    def test_reads_the_idx_files(self):
        folder = self.create_tempdir().full_path
        arrays = fake_fashion_mnist(folder)
        (x, y), (xt, yt) = datasets.load_fashion_mnist(path=folder)
        self.assertEqual(x.shape, (20, 28, 28, 1))
        self.assertEqual(x.dtype, np.float32)
        np.testing.assert_array_equal(
            x[..., 0], arrays["train"][0].astype("float32") / 255.0
        )
        np.testing.assert_array_equal(y, arrays["train"][1])
        np.testing.assert_array_equal(yt, arrays["test"][1])
        self.assertEqual(xt.shape, (7, 28, 28, 1))

    def test_noise_corrupts_train_labels_only(self):
        folder = self.create_tempdir().full_path
        fake_fashion_mnist(folder, train_size=100)
        (_, clean), (_, clean_test) = datasets.load_fashion_mnist(path=folder)
        (_, noisy), (_, noisy_test) = datasets.load_fashion_mnist(
            0.4, seed=1, path=folder
        )
        self.assertAlmostEqual(np.mean(clean != noisy), 0.4, places=6)
        np.testing.assert_array_equal(clean_test, noisy_test)

    def test_missing_files_say_how_to_install(self):
        folder = self.create_tempdir().full_path
        with self.assertRaisesRegex(
            FileNotFoundError, "apt-get install dataset-fashion-mnist"
        ):
            datasets.load_fashion_mnist(path=folder)

    def test_wrong_or_truncated_files(self):
        folder = self.create_tempdir().full_path
        fake_fashion_mnist(folder)
        images_file, labels_file = fashion_mnist.FILES["train"]
        os.replace(
            os.path.join(folder, labels_file),
            os.path.join(folder, "labels.gz"),
        )
        os.replace(
            os.path.join(folder, images_file),
            os.path.join(folder, labels_file),
        )
        os.replace(
            os.path.join(folder, "labels.gz"),
            os.path.join(folder, images_file),
        )
        with self.assertRaisesRegex(ValueError, "magic number is 2049"):
            datasets.load_fashion_mnist(path=folder)
        with gzip.open(os.path.join(folder, images_file), "wb") as file:
            file.write(struct.pack(">iiii", 0x0803, 20, 28, 28))
            file.write(b"\0" * 100)
        with self.assertRaisesRegex(ValueError, "truncated"):
            fashion_mnist.read_split("train", folder)

    @pytest.mark.skipif(
        not os.path.isdir(fashion_mnist.DEFAULT_PATH),
        reason="dataset-fashion-mnist is not installed",
    )
    def test_the_installed_data(self):
        (x, y), (xt, yt) = datasets.load_fashion_mnist()
        self.assertEqual(x.shape, (60000, 28, 28, 1))
        self.assertEqual(xt.shape, (10000, 28, 28, 1))
        np.testing.assert_array_equal(np.bincount(y), [6000] * 10)
        np.testing.assert_array_equal(np.bincount(yt), [1000] * 10)
