import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from keras_selfdistill import data


class WithSampleIdsTest(parameterized.TestCase):
    def test_numpy_inputs(self):
        x = np.zeros((5, 2))
        out = data.with_sample_ids(x)
        self.assertIs(out["inputs"], x)
        np.testing.assert_array_equal(out["sample_id"], np.arange(5))
        merged = data.with_sample_ids({"a": x, "b": x})
        self.assertEqual(sorted(merged), ["a", "b", "sample_id"])

    def test_dataset_ids_follow_original_order(self):
        x = np.arange(6, dtype="float32")[:, None] * 10
        y = np.arange(6)
        dataset = data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices((x, y))
        ).shuffle(6, seed=0)
        for inputs, label in dataset:
            self.assertEqual(int(inputs["sample_id"]), int(label))
            self.assertEqual(float(inputs["inputs"][0]), 10.0 * int(label))

    def test_errors(self):
        with self.assertRaisesRegex(TypeError, "list"):
            data.with_sample_ids([1, 2])
        with self.assertRaisesRegex(ValueError, "sizes \\[2, 3\\]"):
            data.with_sample_ids({"a": np.zeros(2), "b": np.zeros(3)})
        with self.assertRaisesRegex(ValueError, "already hold"):
            data.with_sample_ids({"sample_id": np.zeros(2)})
