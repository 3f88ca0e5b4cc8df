import numpy as np
from absl.testing import parameterized

from keras_selfdistill import datasets


class LoadMnistTest(parameterized.TestCase):
    def test_shapes_and_range(self):
        (x, y), (xt, yt) = datasets.load_mnist()
        self.assertEqual(x.shape, (4000, 28, 28, 1))
        self.assertEqual(xt.shape, (1000, 28, 28, 1))
        self.assertEqual(x.dtype, np.float32)
        self.assertEqual((x.min(), x.max()), (0.0, 1.0))
        self.assertEqual(sorted(np.unique(y)), list(range(10)))
        self.assertEqual(len(yt), 1000)

    def test_noise_corrupts_train_labels_only(self):
        (_, clean), (_, clean_test) = datasets.load_mnist()
        (_, noisy), (_, noisy_test) = datasets.load_mnist(0.4, seed=3)
        self.assertAlmostEqual(np.mean(clean != noisy), 0.4, places=6)
        np.testing.assert_array_equal(clean_test, noisy_test)
        (_, again), _ = datasets.load_mnist(0.4, seed=3)
        np.testing.assert_array_equal(noisy, again)


class LoadDigitsTest(parameterized.TestCase):
    def test_shapes(self):
        (x, y), (xt, yt) = datasets.load_digits()
        self.assertEqual(x.shape, (1347, 8, 8, 1))
        self.assertEqual(xt.shape, (450, 8, 8, 1))
        self.assertEqual(len(y) + len(yt), 1797)
