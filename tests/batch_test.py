import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from keras_selfdistill import batch


class FingerprintTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("float32_images", lambda r: r.normal(size=(40, 6, 6, 1)), "float32"),
        ("uint8", lambda r: r.integers(0, 255, size=(40, 7, 3)), "uint8"),
        ("int64_scalars", lambda r: r.integers(0, 10**12, size=(40,)), None),
        ("float16", lambda r: r.normal(size=(40, 5)), "float16"),
        ("bool", lambda r: r.normal(size=(40, 4)) > 0, None),
        ("float64_zeros", lambda r: np.zeros((40, 8)), None),
        ("strided", lambda r: r.normal(size=(80, 6))[::2, ::2], "float32"),
        ("big_endian", lambda r: r.normal(size=(40, 3)), ">f4"),
        (
            "dict",
            lambda r: {
                "b": r.normal(size=(40, 3)).astype("float32"),
                "a": r.integers(0, 9, size=(40, 2)).astype("int32"),
            },
            None,
        ),
    )
    def test_array_fingerprints_equal_the_per_example_hash(self, make, dtype):
        # NumPy inputs are hashed from their rows' bytes in one op; the
        # reference is `fingerprint` on each example of a tf.data dataset.
        x = make(np.random.default_rng(0))
        if dtype is not None:
            x = x.astype(dtype)
        leaves = [np.asarray(leaf) for leaf in tf.nest.flatten(x)]
        size = len(leaves[0])
        got = batch.array_fingerprints(x, size)
        examples = tf.data.Dataset.from_tensor_slices(x).map(batch.fingerprint)
        np.testing.assert_array_equal(got, [int(e) for e in examples])
        # Every kind but the big-endian array takes the fast path.
        fast = batch.serialized_headers(leaves, size) is not None
        self.assertEqual(fast, dtype != ">f4")


class IdRuleTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("below", [0, -1, 2], True, "ids from -1 to 2"),
        ("above", [0, 5, 2], True, "ids from 0 to 5"),
        ("repeated", [1, 3, 1], True, r"repeated, e\.g\. \[1\]"),
    )
    def test_every_form_gives_the_one_message(self, ids, unique, received):
        rule = r"ids must lie in \[0, num_samples=5\)"
        with self.assertRaisesRegex(ValueError, f"(?s){rule}.*{received}"):
            batch.check_ids(np.array(ids), 5, unique)
        with self.assertRaisesRegex(
            tf.errors.InvalidArgumentError, rule + ".*unique"
        ):
            batch.ids_assertion(tf.constant(ids), 5, unique)
        if keras.backend.backend() == "tensorflow":
            # Eagerly, the step's form is the same assertion.
            with self.assertRaisesRegex(tf.errors.InvalidArgumentError, rule):
                batch.checked_ids(tf.constant(ids), 5, unique)
        else:
            with self.assertRaisesRegex(ValueError, rule):
                batch.checked_ids(np.array(ids), 5, unique)

    def test_repeated_ids_pass_where_no_row_is_written(self):
        batch.check_ids(np.array([1, 1, 4]), 5, unique=False)
        batch.ids_assertion(tf.constant([1, 1, 4]), 5, unique=False)
        with self.assertRaisesRegex(ValueError, r"num_samples=5\)\. Rec"):
            batch.check_ids(np.array([1, 5]), 5, unique=False)


class SelectInputTest(parameterized.TestCase):
    def test_layout_keys_are_removed(self):
        x = np.zeros((2, 3))
        laid = batch.with_layout(x, np.arange(2), np.ones(2, "int32"))
        self.assertIs(batch.select_input(laid, None, "The student"), x)
        both = {"student": x, "teacher": x + 1, batch.SAMPLE_ID: [0, 1]}
        self.assertIs(batch.select_input(both, "student", "The student"), x)
        with self.assertRaisesRegex(ValueError, "Add sample ids once"):
            batch.with_layout(laid, np.arange(2), np.ones(2, "int32"))
