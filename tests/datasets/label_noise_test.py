import numpy as np
from absl.testing import parameterized

from keras_selfdistill import datasets


class AddLabelNoiseTest(parameterized.TestCase):
    def test_flips_exact_fraction_to_other_classes(self):
        labels = np.repeat(np.arange(5), 40)
        noisy = datasets.add_label_noise(labels, 0.25, seed=1)
        self.assertEqual(int(np.sum(noisy != labels)), 50)
        self.assertTrue(np.all((noisy >= 0) & (noisy < 5)))

    def test_zero_rate_is_identity(self):
        labels = np.arange(10)
        np.testing.assert_array_equal(
            datasets.add_label_noise(labels, 0.0), labels
        )

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "rate=1.5"):
            datasets.add_label_noise(np.arange(3), 1.5)
        with self.assertRaisesRegex(ValueError, "dtype float"):
            datasets.add_label_noise(np.array([0.0, 1.0]), 0.1)
        with self.assertRaisesRegex(ValueError, "num_classes=1"):
            datasets.add_label_noise(np.zeros(4, int), 0.5)
