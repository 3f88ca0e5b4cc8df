import numpy as np
from absl.testing import parameterized

from keras_selfdistill import metrics


class ExpectedCalibrationErrorTest(parameterized.TestCase):
    def test_config(self):
        metric = metrics.ExpectedCalibrationError(num_bins=10, from_logits=True)
        restored = metrics.ExpectedCalibrationError.from_config(
            metric.get_config()
        )
        self.assertEqual(restored.get_config(), metric.get_config())

    def test_matches_numpy(self):
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(200, 4)).astype("float32") * 2
        labels = rng.integers(0, 4, size=200)
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        confidence, predicted = probs.max(-1), probs.argmax(-1)
        # Bins ((b−1)/15, b/15]: Σ_b |Σ hits − Σ confidence| / n.
        bins = np.clip(np.ceil(confidence * 15).astype(int) - 1, 0, 14)
        expected = sum(
            abs(
                (predicted[bins == b] == labels[bins == b]).sum()
                - confidence[bins == b].sum()
            )
            for b in range(15)
        ) / len(labels)
        metric = metrics.ExpectedCalibrationError(from_logits=True)
        metric.update_state(labels[:120], logits[:120])
        metric.update_state(labels[120:], logits[120:])
        self.assertAlmostEqual(float(metric.result()), expected, places=5)

    def test_one_hot_labels_and_sample_weight(self):
        probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]], "float32")
        one_hot = np.array([[1, 0], [0, 1], [0, 1]], "float32")
        metric = metrics.ExpectedCalibrationError(
            num_bins=10, from_logits=False
        )
        metric.update_state(one_hot, probs, sample_weight=[1.0, 1.0, 0.0])
        # Kept: conf 0.9 correct (bin 9), conf 0.6 wrong (bin 6):
        # (|1 − 0.9| + |0 − 0.6|) / 2 = 0.35.
        self.assertAlmostEqual(float(metric.result()), 0.35, places=6)
        metric.reset_state()
        self.assertEqual(float(metric.result()), 0.0)

    def test_reads_logits_by_default(self):
        logits = np.array([[3.0, -1.0], [0.5, 2.5]], "float32")
        labels = np.array([0, 1])
        default = metrics.ExpectedCalibrationError()
        default.update_state(labels, logits)
        explicit = metrics.ExpectedCalibrationError(from_logits=False)
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        explicit.update_state(labels, probs)
        self.assertAlmostEqual(
            float(default.result()), float(explicit.result()), places=6
        )

    def test_refuses_logits_as_probabilities(self):
        metric = metrics.ExpectedCalibrationError(from_logits=False)
        logits = np.array([[3.0, -1.0], [0.5, 2.5]], "float32")
        with self.assertRaisesRegex(Exception, "needs probabilities"):
            metric.update_state(np.array([0, 1]), logits)
        with self.assertRaisesRegex(TypeError, "from_logits='yes'"):
            metrics.ExpectedCalibrationError(from_logits="yes")

    def test_rejects_bad_bins(self):
        with self.assertRaisesRegex(ValueError, "num_bins=0"):
            metrics.ExpectedCalibrationError(num_bins=0)
