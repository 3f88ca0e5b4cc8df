import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny


class PastPredictionsTest(parameterized.TestCase):
    def test_config(self):
        teacher = ksd.teachers.PastPredictions(10, 3, dtype="float32")
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(teacher)
        )
        self.assertEqual(restored.num_samples, 10)
        self.assertEqual(restored.num_classes, 3)
        self.assertEqual(restored.storage_dtype, "float32")
        self.assertEqual(restored.bank.dtype, "float32")

    def test_targets_are_previous_predictions_by_id(self):
        teacher = ksd.teachers.PastPredictions(6, 3)
        rng = np.random.default_rng(0)
        first, second = rng.normal(size=(2, 4, 3)).astype("float32")
        ids = np.array([4, 0, 5, 2])
        # First visit: no past prediction, the target is the student itself.
        got = teacher.targets({"sample_id": ids}, first, 1.0)
        np.testing.assert_allclose(
            tiny.softmax(np.asarray(got)), tiny.softmax(first), rtol=1e-5
        )
        # Second visit, other order: each id gets its own first prediction
        # (stored as float16 log-probabilities), whatever the temperature.
        self.assertEqual(teacher.target_kind, "log_probs")
        order = np.array([2, 0, 3, 1])
        got = teacher.targets({"sample_id": ids[order]}, second[order], 2.0)
        np.testing.assert_allclose(
            np.exp(np.asarray(got)),
            tiny.softmax(first[order]),
            atol=2e-3,
        )

    def test_pskd_loss_matches_numpy(self):
        # With ξ = α the gradients equal PS-KD's cross-entropy against the
        # mixed target (1 − α)·y + α·p_prev; the two objectives differ by
        # α·H(p_prev), a constant: CE(mix) = (1 − α)·CE(y) + α·KL + α·H.
        teacher = ksd.teachers.PastPredictions(4, 3, dtype="float32")
        term = ksd.terms.Distillation(teacher, xi=0.3)
        rng = np.random.default_rng(1)
        previous, current = rng.normal(size=(2, 4, 3)).astype("float32")
        labels = np.array([0, 2, 1, 1])
        x = {"sample_id": np.arange(4)}
        term.compute_loss(x, labels, previous, None, 0, 0)
        kd = float(term.compute_loss(x, labels, current, None, 0, 0))
        p_prev, p = tiny.softmax(previous), tiny.softmax(current)
        kl = np.sum(p_prev * (np.log(p_prev) - np.log(p)), axis=-1)
        self.assertAlmostEqual(kd, kl.mean(), places=5)
        ce = -np.log(p[np.arange(4), labels])
        mixed = 0.7 * np.eye(3)[labels] + 0.3 * p_prev
        entropy = -np.sum(p_prev * np.log(p_prev), axis=-1)
        np.testing.assert_allclose(
            -np.sum(mixed * np.log(p), axis=-1),
            0.7 * ce + 0.3 * kl + 0.3 * entropy,
            rtol=1e-5,
        )

    def test_bank_identical_after_shuffled_and_ordered_epochs(self):
        x, y = tiny.data(n=16)
        banks = []
        for shuffled in (False, True):
            teacher = ksd.teachers.PastPredictions(16, 3, dtype="float32")
            distiller = ksd.Distiller(
                tiny.mlp(seed=3), [ksd.terms.Distillation(teacher)]
            )
            distiller.compile(
                optimizer=keras.optimizers.SGD(0.0), loss=tiny.sparse_ce()
            )
            data = ksd.data.with_sample_ids(
                tf.data.Dataset.from_tensor_slices((x, y))
            )
            if shuffled:
                data = data.shuffle(16, seed=1)
            distiller.fit(data.batch(5), epochs=1, verbose=0)
            banks.append(teacher.bank.numpy())
        np.testing.assert_allclose(banks[0], banks[1], rtol=1e-6)
        expected = keras.ops.convert_to_numpy(
            keras.ops.log_softmax(tiny.mlp(seed=3)(x))
        )
        np.testing.assert_allclose(banks[0], expected, rtol=1e-5, atol=1e-6)

    def test_numpy_inputs_with_keras_shuffling(self):
        x, y = tiny.data(n=12)
        teacher = ksd.teachers.PastPredictions(12, 3, dtype="float32")
        student = tiny.mlp(seed=4)
        distiller = ksd.Distiller(student, [ksd.terms.Distillation(teacher)])
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.0), loss=tiny.sparse_ce()
        )
        distiller.fit(
            ksd.data.with_sample_ids(x),
            y,
            batch_size=5,
            shuffle=True,
            verbose=0,
        )
        np.testing.assert_allclose(
            teacher.bank.numpy(),
            keras.ops.convert_to_numpy(keras.ops.log_softmax(student(x))),
            rtol=1e-5,
            atol=1e-6,
        )
        self.assertFalse(np.isinf(teacher.bank.numpy()).any())

    def test_rejects_bad_ids(self):
        teacher = ksd.teachers.PastPredictions(4, 3)
        logits = np.zeros((2, 3), "float32")
        with self.assertRaisesRegex(ValueError, "with_sample_ids"):
            teacher.targets(np.zeros((2, 4)), logits, 1.0)
        # Checked in the graph on TensorFlow, on concrete ids on JAX.
        errors = (tf.errors.InvalidArgumentError, ValueError)
        with self.assertRaisesRegex(errors, r"(?s)num_samples=4\).*1.*4"):
            teacher.targets({"sample_id": np.array([1, 4])}, logits, 1.0)
        with self.assertRaisesRegex(errors, r"unique within a batch"):
            teacher.targets({"sample_id": np.array([1, 1])}, logits, 1.0)
        with self.assertRaisesRegex(ValueError, "before batching"):
            teacher.targets({"sample_id": np.zeros((2, 1))}, logits, 1.0)

    def test_rejects_bank_over_budget(self):
        with self.assertRaisesRegex(ValueError, "5.13 GB.*1,281,167"):
            ksd.teachers.PastPredictions(1_281_167, 1000, dtype="float32")
        ksd.teachers.PastPredictions(1000, 10, max_bytes=24_000)
        with self.assertRaisesRegex(ValueError, "max_bytes=23,999"):
            ksd.teachers.PastPredictions(1000, 10, max_bytes=23_999)

    def test_rejects_class_mismatch_and_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "built for 5 classes"):
            ksd.teachers.PastPredictions(4, 5).attach(tiny.mlp())
        with self.assertRaisesRegex(TypeError, "num_samples=4.0"):
            ksd.teachers.PastPredictions(4.0, 3)
        with self.assertRaisesRegex(ValueError, "dtype='int8'"):
            ksd.teachers.PastPredictions(4, 3, dtype="int8")


class BankRangeTest(parameterized.TestCase):
    def test_huge_logits_stay_finite_in_a_float16_bank(self):
        # log-softmax of logits 1e5 apart is -1e5, below float16's -65504:
        # stored as -inf, the next visit's KL was NaN.
        teacher = ksd.teachers.PastPredictions(2, 3)
        term = ksd.terms.Distillation(teacher)
        logits = np.array([[1e5, 0.0, -1e5], [0.0, 1e5, 0.0]], "float32")
        ids = {"sample_id": np.array([0, 1])}
        term.compute_loss(ids, None, logits, None, 0, 0)
        self.assertTrue(np.isfinite(np.asarray(teacher.bank)).all())
        loss = term.compute_loss(ids, None, logits[::-1], None, 0, 0)
        self.assertTrue(np.isfinite(float(loss)))


class OddBatchesTest(parameterized.TestCase):
    @parameterized.named_parameters(("five", 5), ("one", 1))
    def test_uneven_last_batch_fills_every_row(self, batch_size):
        x, y = tiny.data(n=24)
        teacher = ksd.teachers.PastPredictions(24, 3)
        distiller = ksd.Distiller(
            tiny.mlp(), [ksd.terms.Distillation(teacher, xi=0.5)]
        )
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        history = distiller.fit(
            ksd.data.with_sample_ids(x),
            y,
            batch_size=batch_size,
            epochs=2,
            verbose=0,
        ).history
        self.assertTrue(np.isfinite(np.asarray(teacher.bank)).all())
        self.assertTrue(np.all(np.isfinite(history["loss"])))
