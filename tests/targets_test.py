import keras
import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny


def _log(p):
    return np.log(np.float64(p))


class LogProbsTest(parameterized.TestCase):
    def test_logits_are_tempered_and_log_probabilities_renormalised(self):
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(4, 5)).astype("float32") * 3
        got = keras.ops.convert_to_numpy(
            ksd.targets.log_probs(logits, "logits", 2.0)
        )
        np.testing.assert_allclose(
            np.exp(got), tiny.softmax(logits / 2.0), rtol=1e-5
        )
        # Log-probabilities are not divided by T: only renormalised (a
        # vocabulary cut to its first classes sums to 1 again).
        log_p = np.log(tiny.softmax(logits))
        got = keras.ops.convert_to_numpy(
            ksd.targets.log_probs(log_p[:, :3], "log_probs", 2.0)
        )
        np.testing.assert_allclose(
            np.exp(got), tiny.softmax(logits[:, :3]), rtol=1e-5
        )

    def test_an_unknown_kind_is_refused(self):
        with self.assertRaisesRegex(ValueError, "kind must be one of"):
            ksd.targets.log_probs(np.zeros((1, 3)), "probs")


class MixtureTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(1)
        self.probs = tiny.softmax(rng.normal(size=(3, 4, 5)) * 2)

    def test_weighted_mixture_in_log_space(self):
        got = ksd.targets.mixture(_log(self.probs), weights=[1.0, 1.0, 2.0])
        expected = (self.probs[0] + self.probs[1] + 2 * self.probs[2]) / 4
        np.testing.assert_allclose(
            np.exp(keras.ops.convert_to_numpy(got)), expected, rtol=1e-5
        )

    def test_zero_weights_and_empty_classes_are_probability_zero(self):
        votes = np.eye(5)[[[0, 1, 1, 4], [0, 1, 2, 4], [3, 3, 3, 3]]]
        log_votes = np.where(votes > 0, 0.0, -np.inf).astype("float32")
        got = keras.ops.convert_to_numpy(
            ksd.targets.mixture(log_votes, weights=[1.0, 1.0, 0.0])
        )
        self.assertTrue(np.all(np.isfinite(got)))
        self.assertEqual(got.min(), ksd.targets.LOG_ZERO)
        np.testing.assert_allclose(
            np.exp(got), (votes[0] + votes[1]) / 2, atol=1e-7
        )

    def test_smoothing_adds_mass_to_every_class(self):
        epsilon = 1e-3
        got = ksd.targets.mixture(_log(self.probs), smoothing=epsilon)
        expected = (self.probs.mean(0) + epsilon) / (1 + 5 * epsilon)
        np.testing.assert_allclose(
            np.exp(keras.ops.convert_to_numpy(got)), expected, rtol=1e-5
        )

    def test_per_sample_weights(self):
        shares = np.array([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
        shares = np.concatenate([shares, [[0.0, 0.0, 0.0, 1.0]]])
        got = ksd.targets.mixture(_log(self.probs), weights=shares[..., None])
        # Per sample: members 0 and 1; 1; 0; 2.
        expected = np.stack(
            [
                (self.probs[0, 0] + self.probs[1, 0]) / 2,
                self.probs[1, 1],
                self.probs[0, 2],
                self.probs[2, 3],
            ]
        )
        np.testing.assert_allclose(
            np.exp(keras.ops.convert_to_numpy(got)), expected, rtol=1e-5
        )
