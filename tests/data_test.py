import keras
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import parameterized

import keras_selfdistill as ksd
from keras_selfdistill import data
from tests import tiny


class _FourShards(tfds.core.GeneratorBasedBuilder):
    """64 examples written offline into 4 shards."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "x": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            ),
            supervised_keys=("x", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        x, y = tiny.data(n=64)
        for i in range(64):
            # The first feature names the example, for the test.
            features = np.concatenate([[i], x[i, 1:]]).astype("float32")
            yield i, {"x": features, "label": y[i]}


class WithSampleIdsTest(parameterized.TestCase):
    def test_numpy_inputs(self):
        x = np.zeros((5, 2))
        out = data.with_sample_ids(x)
        self.assertIs(out["inputs"], x)
        np.testing.assert_array_equal(out["sample_id"], np.arange(5))
        self.assertEqual(out["sample_fingerprint"].dtype, np.int32)
        self.assertTrue(np.all(out["sample_fingerprint"] != 0))
        merged = data.with_sample_ids({"a": x, "b": x})
        self.assertEqual(
            sorted(merged), ["a", "b", "sample_fingerprint", "sample_id"]
        )

    def test_dataset_ids_follow_original_order(self):
        x = np.arange(6, dtype="float32")[:, None] * 10
        y = np.arange(6)
        dataset = data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices((x, y))
        ).shuffle(6, seed=0)
        for inputs, label in dataset:
            self.assertEqual(int(inputs["sample_id"]), int(label))
            self.assertEqual(float(inputs["inputs"][0]), 10.0 * int(label))

    def test_ids_survive_cache_shuffle_repeat_take(self):
        x = np.arange(8, dtype="float32")[:, None]
        dataset = (
            data.with_sample_ids(tf.data.Dataset.from_tensor_slices(x))
            .cache()
            .shuffle(8)
            .repeat(3)
            .take(20)
        )
        for element in dataset:
            self.assertEqual(
                int(element["sample_id"]), int(element["inputs"][0])
            )

    def test_fingerprints_match_between_arrays_and_datasets(self):
        x = tiny.data(n=6)[0]
        arrays = data.with_sample_ids(x)["sample_fingerprint"]
        dataset = data.with_sample_ids(tf.data.Dataset.from_tensor_slices(x))
        np.testing.assert_array_equal(
            [int(e["sample_fingerprint"]) for e in dataset], arrays
        )

    def test_tfds_split_with_shuffled_files_keeps_every_id(self):
        builder = _FourShards(data_dir=self.create_tempdir().full_path)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(num_shards=4)
        )
        self.assertLen(builder.info.splits["train"].shard_lengths, 4)
        dataset = builder.as_dataset(
            split="train",
            shuffle_files=True,
            read_config=tfds.ReadConfig(add_tfds_id=True),
        )
        train = data.with_sample_ids(dataset, builder.info, "train")
        epochs = []
        for _ in range(3):
            pairs = {
                int(inputs["sample_id"]): float(inputs["inputs"][0])
                for inputs, _ in train
            }
            epochs.append(pairs)
        self.assertEqual(sorted(epochs[0]), list(range(64)))
        for pairs in epochs[1:]:
            self.assertEqual(pairs, epochs[0])
        # Without supervised keys the dict gains the two keys.
        plain = builder.as_dataset(
            split="train[:50%]",
            read_config=tfds.ReadConfig(add_tfds_id=True),
        )
        info = builder.info
        element = next(
            iter(
                data.with_sample_ids(
                    plain, _NoSupervisedKeys(info), "train[:50%]"
                )
            )
        )
        self.assertEqual(
            sorted(element), ["label", "sample_fingerprint", "sample_id", "x"]
        )

    def test_errors(self):
        with self.assertRaisesRegex(TypeError, "list"):
            data.with_sample_ids([1, 2])
        with self.assertRaisesRegex(ValueError, "sizes \\[2, 3\\]"):
            data.with_sample_ids({"a": np.zeros(2), "b": np.zeros(3)})
        with self.assertRaisesRegex(ValueError, "already hold"):
            data.with_sample_ids({"sample_id": np.zeros(2)})
        tagged = tf.data.Dataset.from_tensor_slices(
            {"x": np.zeros((2, 1)), "tfds_id": ["a-00000-of-00001__0"] * 2}
        )
        with self.assertRaisesRegex(TypeError, "with_info=True"):
            data.with_sample_ids(tagged)
        untagged = tf.data.Dataset.from_tensor_slices(np.zeros((2, 1)))
        with self.assertRaisesRegex(ValueError, "add_tfds_id=True"):
            data.with_sample_ids(untagged, info=object())


class _NoSupervisedKeys:
    def __init__(self, info):
        self.splits = info.splits
        self.supervised_keys = None


class MovedIdsTest(parameterized.TestCase):
    def _distiller(self):
        distiller = ksd.Distiller(
            tiny.mlp(), [ksd.recipes.ps_kd(24, 3, epochs=4)]
        )
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        return distiller

    def test_ids_attached_after_a_reshuffling_shuffle(self):
        x, y = tiny.data()
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
            24, reshuffle_each_iteration=True
        )
        train = data.with_sample_ids(dataset).batch(8)
        with self.assertRaisesRegex(ValueError, "named another example"):
            self._distiller().fit(train, epochs=4, verbose=0)

    def test_arrays_resliced_between_fit_calls(self):
        x, y = tiny.data()
        distiller = self._distiller()
        distiller.fit(data.with_sample_ids(x), y, verbose=0)
        order = np.arange(24)[::-1]
        with self.assertRaisesRegex(ValueError, "24 moved ids"):
            distiller.fit(data.with_sample_ids(x[order]), y[order], verbose=0)

    def test_same_arrays_again_are_fine(self):
        x, y = tiny.data()
        distiller = self._distiller()
        for _ in range(2):
            distiller.fit(data.with_sample_ids(x), y, epochs=2, verbose=0)
        self.assertEqual(int(keras.ops.convert_to_numpy(distiller.epoch)), 4)
