import keras
import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd
from keras_selfdistill import _internals
from tests import tiny
from tests.terms.on_policy_test import _windows

EPOCHS, BATCH, LEARNING_RATE, ALPHA = 4, 8, 0.5, 0.8


def _pskd_trajectory(x, y, kernel, bias, permutations):
    """PS-KD on softmax regression with plain SGD, in float64.

    Follows lgcnsai/PS-KD-Pytorch `main.py`: `alpha_t = alpha_T * (epoch +
    1) / T`; in epoch 0 the past predictions are the one-hot labels; the
    loss is the cross-entropy against `(1 − α_t)·y + α_t·p_prev`, whose
    gradient in the logits is `(p − target) / batch`; the bank keeps the
    softmax of the training forward pass, before the update.
    """
    kernel, bias = np.float64(kernel), np.float64(bias)
    one_hot = np.eye(tiny.NUM_CLASSES)[y]
    bank = one_hot.copy()
    for epoch, order in enumerate(permutations):
        alpha = ALPHA * (epoch + 1) / EPOCHS
        for start in range(0, len(order), BATCH):
            ids = order[start : start + BATCH]
            probs = tiny.softmax(x[ids] @ kernel + bias)
            target = (1 - alpha) * one_hot[ids] + alpha * bank[ids]
            gradient = (probs - target) / len(ids)
            bank[ids] = probs
            kernel = kernel - LEARNING_RATE * x[ids].T @ gradient
            bias = bias - LEARNING_RATE * gradient.sum(axis=0)
    return kernel, bias


def fit_epochs(term, x, y, permutations):
    """Trains softmax regression with `term`, one `fit` per permutation.

    Returns the initial `(kernel, bias)` and the trained weights.
    """
    keras.utils.set_random_seed(0)
    student = keras.Sequential(
        [keras.Input((x.shape[1],)), keras.layers.Dense(tiny.NUM_CLASSES)]
    )
    start = [np.asarray(w) for w in student.get_weights()]
    distiller = ksd.Distiller(student, [term])
    distiller.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE), loss=tiny.sparse_ce()
    )
    # One `fit` per epoch: the epoch counter, and so α_t, goes on.
    for order in permutations:
        distiller.fit(
            {"inputs": x[order], "sample_id": order},
            y[order],
            batch_size=BATCH,
            shuffle=False,
            epochs=1,
            verbose=0,
        )
    return start, student.get_weights()


class PSKDTest(parameterized.TestCase):
    def test_config(self):
        term = ksd.recipes.ps_kd(10, 3, epochs=5, alpha=0.6)
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(term)
        )
        self.assertEqual(restored.name, "ps_kd")
        self.assertIsInstance(restored.teacher, ksd.teachers.PastPredictions)
        # α_t = 0.6·(t + 1)/5 for t = 0 … 4, then it stays at 0.6.
        values = [float(restored.hyperparameter("xi", 0, t)) for t in range(6)]
        np.testing.assert_allclose(
            values, [0.12, 0.24, 0.36, 0.48, 0.6, 0.6], rtol=1e-6
        )
        self.assertAlmostEqual(
            ksd.recipes.ps_kd(10, 3, epochs=1, alpha=0.6).xi, 0.6, places=6
        )

    @parameterized.named_parameters(
        ("float32_bank", "float32", 1e-5), ("float16_bank", "float16", 2e-3)
    )
    def test_matches_numpy_pskd_over_shuffled_epochs(self, dtype, tolerance):
        x, y = tiny.data(n=24)
        rng = np.random.default_rng(3)
        permutations = [rng.permutation(24) for _ in range(EPOCHS)]
        (kernel, bias), weights = fit_epochs(
            ksd.recipes.ps_kd(24, 3, epochs=EPOCHS, dtype=dtype),
            x,
            y,
            permutations,
        )
        expected = _pskd_trajectory(x, y, kernel, bias, permutations)
        for got, want in zip(weights, expected):
            np.testing.assert_allclose(got, want, atol=tolerance)

    def test_first_epoch_is_plain_cross_entropy(self):
        x, y = tiny.data(n=24)
        runs = []
        for terms in ([ksd.recipes.ps_kd(24, 3, epochs=EPOCHS)], []):
            student = tiny.mlp(seed=1)
            distiller = ksd.Distiller(student, terms)
            distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
            distiller.fit(
                ksd.data.with_sample_ids(x),
                y,
                batch_size=8,
                shuffle=False,
                verbose=0,
            )
            runs.append(student.get_weights())
        for with_pskd, plain in zip(*runs):
            np.testing.assert_allclose(with_pskd, plain, atol=1e-6)

    def test_rejects_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "alpha=1.5"):
            ksd.recipes.ps_kd(10, 3, epochs=5, alpha=1.5)
        with self.assertRaisesRegex(ValueError, "epochs=0"):
            ksd.recipes.ps_kd(10, 3, epochs=0)


class MeanTeacherTest(parameterized.TestCase):
    def test_is_the_official_setting(self):
        term = ksd.recipes.mean_teacher(keras.layers.Identity())
        self.assertIsInstance(term, ksd.terms.Consistency)
        self.assertEqual((term.loss, term.name), ("mse", "mean_teacher"))
        self.assertEqual(term.temperature, 1.0)
        self.assertEqual(term.teacher.momentum, 0.97)
        self.assertTrue(term.teacher.warmup)
        # consistency · sigmoid_rampup(epoch, 5), the integer epoch.
        weights = [float(term.weight(0, epoch)) for epoch in range(7)]
        expected = [
            100.0 * np.exp(-5.0 * (1.0 - min(epoch, 5) / 5) ** 2)
            for epoch in range(7)
        ]
        np.testing.assert_allclose(weights, expected, rtol=1e-6)

    def test_trains_semi_supervised_and_refuses_bad_arguments(self):
        x, y = tiny.data(n=16)
        y = np.where(np.arange(16) % 2 == 0, y, -1)
        distiller = ksd.Distiller(
            tiny.mlp(),
            [ksd.recipes.mean_teacher(keras.layers.GaussianNoise(0.1))],
        )
        distiller.compile(
            "adam",
            keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, ignore_class=-1
            ),
        )
        history = distiller.fit(x, y, batch_size=8, epochs=2, verbose=0)
        self.assertIn("mean_teacher_loss", history.history)
        self.assertIn("mean_teacher_weight", history.history)
        with self.assertRaisesRegex(ValueError, "consistency=-1"):
            ksd.recipes.mean_teacher(keras.layers.Identity(), consistency=-1)
        with self.assertRaisesRegex(ValueError, "ramp_up_epochs"):
            ksd.recipes.mean_teacher(keras.layers.Identity(), ramp_up_epochs=0)


class SelfDataTest(parameterized.TestCase):
    def test_trains_on_the_originals_greedy_text(self):
        original = tiny.language_model(seed=1)
        term = ksd.recipes.self_data(original, prompt_length=2)
        self.assertIsInstance(term, ksd.terms.SequenceKD)
        self.assertEqual(
            (term.name, term.fraction, term.temperature), ("self_data", 1, 0)
        )
        # The dataset's continuations are never read: two datasets with the
        # same prompts train the same student.
        x, y = _windows()
        other_x, other_y = x.copy(), y.copy()
        other_x[:, 2:] = (x[:, 2:] + 5) % 11
        other_y[:, 1:] = (y[:, 1:] + 3) % 11
        weights = []
        for data in ((x, y), (other_x, other_y)):
            distiller = ksd.Distiller(
                tiny.language_model(seed=2),
                [ksd.recipes.self_data(original, prompt_length=2)],
            )
            distiller.compile(optimizer="adam", loss=tiny.sparse_ce())
            history = distiller.fit(*data, batch_size=4, epochs=2, verbose=0)
            losses = history.history["loss"]
            self.assertLess(losses[-1], losses[0])
            weights.append(
                [_internals.to_numpy(w) for w in distiller.student.weights]
            )
        for a, b in zip(*weights):
            np.testing.assert_array_equal(a, b)
