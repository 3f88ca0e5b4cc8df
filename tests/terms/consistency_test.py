import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny


def _log_softmax(z):
    z = np.float64(z) - np.max(z, axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


class _CountBatch(keras.layers.Layer):
    """Records the batch sizes it sees."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="rows"
        )
        self.calls = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="calls"
        )

    def call(self, inputs):
        self.rows.assign_add(
            keras.ops.cast(keras.ops.shape(inputs)[0], "float32")
        )
        self.calls.assign_add(1.0)
        return inputs


class _HalfBatch(keras.layers.Layer):
    """A broken augmentation: the first half of the batch."""

    def call(self, inputs, training=None):
        return inputs[: keras.ops.shape(inputs)[0] // 2]


class ConsistencyTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.weak = rng.normal(size=(6, 3)).astype("float32") * 2
        self.strong = rng.normal(size=(6, 3)).astype("float32") * 2
        self.y = np.array([0, 1, 2, -1, 1, 0])

    def _loss(self, term, y=None, teacher_x=None):
        outputs = {"output": self.weak, term._key: self.strong}
        return float(term.compute_loss(teacher_x, y, outputs, None, 0, 0))

    def test_config(self):
        term = ksd.terms.Consistency(
            keras.layers.RandomFlip(),
            teacher=ksd.teachers.EMA(0.9),
            temperature=0.5,
            threshold=0.9,
            correct_only=True,
            dynamic_weight=2.0,
            name="fixmatch",
        )
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(term)
        )
        self.assertIsInstance(restored.augment, keras.layers.RandomFlip)
        self.assertIsInstance(restored.teacher, ksd.teachers.EMA)
        self.assertEqual(
            (restored.temperature, restored.threshold, restored.name),
            (0.5, 0.9, "fixmatch"),
        )
        self.assertTrue(restored.correct_only)
        self.assertEqual(restored.dynamic_weight, 2.0)

    @parameterized.named_parameters(("t1", 1.0), ("t05", 0.5))
    def test_soft_targets_match_numpy(self, temperature):
        term = ksd.terms.Consistency(
            keras.layers.Identity(), temperature=temperature
        )
        # KL(softmax(weak / T) ‖ softmax(strong)) per row, batch mean.
        log_q = _log_softmax(self.weak / temperature)
        expected = np.sum(
            np.exp(log_q) * (log_q - _log_softmax(self.strong)), -1
        )
        self.assertAlmostEqual(self._loss(term), expected.mean(), places=5)
        self.assertAlmostEqual(float(term.mask_rate.result()), 1.0)

    @parameterized.named_parameters(("t1", 1.0), ("t05", 0.5))
    def test_mean_teachers_squared_softmax_difference(self, temperature):
        # The official softmax_mse_loss: squared differences summed over
        # classes, divided by their number; then the batch mean.
        term = ksd.terms.Consistency(
            keras.layers.Identity(), temperature=temperature, loss="mse"
        )
        target = np.exp(_log_softmax(self.weak / temperature))
        student = np.exp(_log_softmax(self.strong))
        expected = np.sum((student - target) ** 2, -1) / 3
        self.assertAlmostEqual(self._loss(term), expected.mean(), places=6)
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(term)
        )
        self.assertEqual(restored.loss, "mse")
        with self.assertRaisesRegex(ValueError, "loss='l2'"):
            ksd.terms.Consistency(keras.layers.Identity(), loss="l2")

    def test_fixmatch_pseudo_labels_and_threshold(self):
        term = ksd.terms.Consistency(
            keras.layers.Identity(), temperature=0.0, threshold=0.7
        )
        confident = np.exp(_log_softmax(self.weak)).max(-1) >= 0.7
        guess = self.weak.argmax(-1)
        # Cross-entropy of the strong view with argmax(weak), masked,
        # divided by the whole batch as FixMatch's mean does.
        ce = -_log_softmax(self.strong)[np.arange(6), guess]
        expected = np.sum(ce * confident) / 6
        self.assertTrue(0 < confident.sum() < 6)
        self.assertAlmostEqual(self._loss(term), expected, places=5)
        self.assertAlmostEqual(
            float(term.mask_rate.result()), confident.mean(), places=6
        )

    def test_correct_only_keeps_unlabelled_and_dynamic_weights(self):
        term = ksd.terms.Consistency(
            keras.layers.Identity(), correct_only=True, dynamic_weight=2.0
        )
        guess = self.weak.argmax(-1)
        keep = (guess == self.y) | (self.y < 0)
        log_q, log_s = _log_softmax(self.weak), _log_softmax(self.strong)
        kl = np.sum(np.exp(log_q) * (log_q - log_s), -1)
        dynamic = 1 + 2.0 * (1 - np.exp(log_s)[np.arange(6), guess])
        expected = np.sum(kl * dynamic * keep) / 6
        self.assertAlmostEqual(self._loss(term, self.y), expected, places=5)
        with self.assertRaisesRegex(ValueError, "needs labels"):
            self._loss(term)

    def test_teacher_gives_the_target(self):
        teacher = tiny.mlp(seed=4)
        x, _ = tiny.data(n=6)
        term = ksd.terms.Consistency(keras.layers.Identity(), teacher=teacher)
        term.attach(tiny.mlp())
        log_q = _log_softmax(keras.ops.convert_to_numpy(teacher(x)))
        expected = np.sum(
            np.exp(log_q) * (log_q - _log_softmax(self.strong)), -1
        )
        self.assertAlmostEqual(
            self._loss(term, teacher_x=x), expected.mean(), places=5
        )

    def test_one_forward_on_both_views_and_none_at_validation(self):
        x, y = tiny.images(n=16)
        inputs = keras.Input((6, 6, 1))
        counter = _CountBatch(name="count")
        h = keras.layers.Conv2D(4, 3, activation="relu")(counter(inputs))
        h = keras.layers.GlobalAveragePooling2D()(h)
        student = keras.Model(inputs, keras.layers.Dense(3)(h))
        distiller = ksd.Distiller(
            student,
            [ksd.terms.Consistency(keras.layers.RandomFlip(seed=1))],
            check_data=False,
        )
        distiller.compile("adam", tiny.sparse_ce())
        history = distiller.fit(x, y, batch_size=8, epochs=1, verbose=0)
        self.assertEqual(float(counter.calls.numpy()), 2.0)
        self.assertEqual(float(counter.rows.numpy()), 32.0)
        self.assertGreater(history.history["consistency_loss"][0], 0.0)
        logs = distiller.evaluate(x, y, batch_size=8, verbose=0, return_dict=1)
        self.assertNotIn("consistency_mask_rate", logs)
        self.assertEqual(float(counter.rows.numpy()), 48.0)

    @tiny.ONCE
    def test_semi_supervised_batches_with_an_ignored_class(self):
        x, y = tiny.images(n=16)
        y = y.copy()
        # Half unlabelled, and the first batch of 8 entirely.
        y[::2] = -1
        y[:8] = -1
        for data in (
            (x, y),
            (tf.data.Dataset.from_tensor_slices((x, y)).batch(8),),
        ):
            distiller = ksd.Distiller(
                tiny.cnn(),
                [ksd.terms.Consistency(keras.layers.RandomFlip(seed=1))],
            )
            distiller.compile(
                "adam",
                keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True, ignore_class=-1
                ),
            )
            history = distiller.fit(
                *data, epochs=1, verbose=0, shuffle=len(data) == 2
            )
            self.assertTrue(np.isfinite(history.history["loss"][0]))
        plain = ksd.Distiller(tiny.cnn())
        plain.compile("adam", tiny.sparse_ce())
        with self.assertRaisesRegex(ValueError, "Labels must be class"):
            plain.fit(x, y, verbose=0)

    @tiny.ONCE
    def test_bad_arguments_are_refused(self):
        with self.assertRaisesRegex(TypeError, "augment="):
            ksd.terms.Consistency("flip")
        with self.assertRaisesRegex(ValueError, "temperature=-1"):
            ksd.terms.Consistency(keras.layers.Identity(), temperature=-1)
        with self.assertRaisesRegex(ValueError, "threshold=2"):
            ksd.terms.Consistency(keras.layers.Identity(), threshold=2)
        with self.assertRaisesRegex(TypeError, "correct_only=1"):
            ksd.terms.Consistency(keras.layers.Identity(), correct_only=1)
        x, y = tiny.images(n=8)
        distiller = ksd.Distiller(
            tiny.cnn(),
            [ksd.terms.Consistency(keras.layers.Resizing(4, 4))],
        )
        distiller.compile("adam", tiny.sparse_ce())
        with self.assertRaisesRegex(ValueError, "must keep the inputs' shape"):
            distiller.fit(x, y, verbose=0)

    @parameterized.named_parameters(("arrays", False), ("dataset", True))
    def test_a_view_of_another_batch_size_is_named(self, dataset):
        # From a dataset of unknown batch size, TensorFlow knows the sizes
        # only when the step runs; JAX traces the sizes themselves.
        x, y = tiny.images(n=8)
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
        distiller = ksd.Distiller(
            tiny.cnn(), [ksd.terms.Consistency(_HalfBatch(name="half"))]
        )
        distiller.compile("adam", tiny.sparse_ce())
        with self.assertRaisesRegex(
            # TensorFlow's assertion escapes the apostrophe.
            Exception,
            r"`augment` \(half\) must keep the inputs\\?' shape, batch",
        ) as caught:
            if dataset:
                distiller.fit(data, verbose=0)
            else:
                distiller.fit(x, y, batch_size=4, verbose=0)
        self.assertRegex(
            str(caught.exception),
            r"\(4, 6, 6, 1\) became \(2, 6, 6, 1\)|another batch size",
        )
