import os
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl.testing import parameterized

import keras_selfdistill as ksd
import keras_selfdistill.datasets.builders  # noqa: F401
from keras_selfdistill.datasets import fashion_mnist
from keras_selfdistill.datasets import handwritten_digits
from tests import tiny
from tests.datasets.fashion_mnist_test import fake_fashion_mnist


def _sorted_rows(images):
    """Images in a canonical order: tfds shuffles records when it writes."""
    flat = np.asarray(images).reshape(len(images), -1)
    return flat[np.lexsort(flat.T[::-1])]


def _arrays(dataset):
    images, labels = zip(*tfds.as_numpy(dataset))
    return np.stack(images), np.asarray(labels)


@tiny.ONCE
class BundledMnistTest(parameterized.TestCase):
    def test_load_with_info_and_supervised(self):
        data_dir = self.create_tempdir().full_path
        (train, test), info = tfds.load(
            "bundled_mnist",
            split=["train", "test"],
            as_supervised=True,
            with_info=True,
            data_dir=data_dir,
        )
        self.assertEqual(info.splits["train"].num_examples, 4000)
        self.assertEqual(info.splits["test"].num_examples, 1000)
        self.assertEqual(info.supervised_keys, ("image", "label"))
        raw = handwritten_digits.read_bundled("mnist_5k.npz", 1000)
        for split, dataset in (("train", train), ("test", test)):
            images, labels = _arrays(dataset)
            self.assertEqual(images.shape[1:], (28, 28, 1))
            np.testing.assert_array_equal(
                _sorted_rows(images), _sorted_rows(raw[split][0])
            )
            np.testing.assert_array_equal(
                np.bincount(labels), np.bincount(raw[split][1])
            )

    def test_tfds_ids_key_a_prediction_bank(self):
        data_dir = self.create_tempdir().full_path
        dataset, info = tfds.load(
            "bundled_mnist",
            split="test",
            with_info=True,
            shuffle_files=True,
            data_dir=data_dir,
            read_config=tfds.ReadConfig(add_tfds_id=True),
        )
        tagged = ksd.data.with_sample_ids(dataset, info, "test")
        ids = [int(x["sample_id"]) for x, _ in tfds.as_numpy(tagged)]
        self.assertEqual(sorted(ids), list(range(1000)))


@tiny.ONCE
class BundledDigitsTest(parameterized.TestCase):
    def test_split_sizes_and_values(self):
        data_dir = self.create_tempdir().full_path
        train, info = tfds.load(
            "bundled_digits",
            split="train",
            as_supervised=True,
            with_info=True,
            data_dir=data_dir,
        )
        self.assertEqual(info.splits["train"].num_examples, 1347)
        self.assertEqual(info.splits["test"].num_examples, 450)
        images, _ = _arrays(train)
        self.assertEqual(images.shape, (1347, 8, 8, 1))
        self.assertEqual(images.max(), 16)


@tiny.ONCE
class LocalFashionMnistTest(parameterized.TestCase):
    def test_reads_the_manual_directory(self):
        folder = self.create_tempdir().full_path
        arrays = fake_fashion_mnist(folder)
        train, info = tfds.load(
            "local_fashion_mnist",
            split="train",
            as_supervised=True,
            with_info=True,
            data_dir=self.create_tempdir().full_path,
            download_and_prepare_kwargs={
                "download_config": tfds.download.DownloadConfig(
                    manual_dir=folder
                )
            },
        )
        self.assertEqual(info.splits["train"].num_examples, 20)
        self.assertEqual(info.splits["test"].num_examples, 7)
        self.assertEqual(info.features["label"].names[9], "ankle boot")
        images, labels = _arrays(train)
        np.testing.assert_array_equal(
            _sorted_rows(images), _sorted_rows(arrays["train"][0])
        )
        np.testing.assert_array_equal(
            np.sort(labels), np.sort(arrays["train"][1])
        )

    def test_missing_source_says_how_to_install(self):
        missing = os.path.join(self.create_tempdir().full_path, "absent")
        with mock.patch.object(fashion_mnist, "DEFAULT_PATH", missing):
            with self.assertRaisesRegex(
                FileNotFoundError, "apt-get install dataset-fashion-mnist"
            ):
                tfds.load(
                    "local_fashion_mnist",
                    split="train",
                    data_dir=self.create_tempdir().full_path,
                )

    @pytest.mark.slow
    @pytest.mark.skipif(
        not os.path.isdir(fashion_mnist.DEFAULT_PATH),
        reason="dataset-fashion-mnist is not installed",
    )
    def test_the_installed_data(self):
        _, info = tfds.load(
            "local_fashion_mnist",
            split="test",
            with_info=True,
            data_dir=self.create_tempdir().full_path,
        )
        self.assertEqual(info.splits["train"].num_examples, 60000)
        self.assertEqual(info.splits["test"].num_examples, 10000)
