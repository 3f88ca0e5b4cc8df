import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd


class FrechetDistanceTest(parameterized.TestCase):
    def test_gaussians_in_closed_form(self):
        # Diagonal covariances: ‖μ₁ − μ₂‖² + Σ (s₁ − s₂)² over dimensions,
        # with the samples' own means and variances.
        rng = np.random.default_rng(0)
        a = rng.normal([0, 1, 2], [1, 2, 3], size=(20000, 3))
        b = rng.normal([1, 1, 0], [2, 2, 1], size=(20000, 3))
        a = (a - a.mean(0)) / a.std(0, ddof=1) * [1, 2, 3] + [0, 1, 2]
        b = (b - b.mean(0)) / b.std(0, ddof=1) * [2, 2, 1] + [1, 1, 0]
        got = ksd.diffusion.frechet_distance(a, b)
        # The samples' correlations are not exactly 0: 2e-2 of slack.
        self.assertAlmostEqual(got, 1 + 4 + (1 + 0 + 4), delta=2e-2)

    def test_zero_for_the_same_features_and_symmetric(self):
        rng = np.random.default_rng(1)
        a = rng.normal(size=(200, 5))
        b = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
        self.assertAlmostEqual(ksd.diffusion.frechet_distance(a, a), 0, 6)
        self.assertAlmostEqual(
            ksd.diffusion.frechet_distance(a, b),
            ksd.diffusion.frechet_distance(b, a),
            places=6,
        )

    def test_bad_features(self):
        with self.assertRaisesRegex(ValueError, "same width"):
            ksd.diffusion.frechet_distance(np.ones((4, 2)), np.ones((4, 3)))
        with self.assertRaisesRegex(ValueError, "2-D"):
            ksd.diffusion.frechet_distance(np.ones(4), np.ones((4, 1)))
        with self.assertRaisesRegex(ValueError, "non-finite"):
            ksd.diffusion.frechet_distance(
                np.full((4, 2), np.nan), np.ones((4, 2))
            )


class KernelDistanceTest(parameterized.TestCase):
    def test_matches_a_direct_double_sum(self):
        rng = np.random.default_rng(0)
        a = rng.normal(size=(6, 3))
        b = rng.normal(1.0, size=(6, 3))

        def k(u, v):
            return (np.dot(u, v) / 3 + 1) ** 3

        n = 6
        xx = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j)
        yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j)
        xy = sum(k(a[i], b[j]) for i in range(n) for j in range(n))
        expected = xx / (n * (n - 1)) + yy / (n * (n - 1)) - 2 * xy / n**2
        got = ksd.diffusion.kernel_distance(a, b, subset_size=6, num_subsets=3)
        self.assertAlmostEqual(got, expected, places=10)

    def test_unbiased_near_zero_for_one_distribution(self):
        rng = np.random.default_rng(2)
        a, b = rng.normal(size=(2, 400, 4))
        same = ksd.diffusion.kernel_distance(a, b, subset_size=400)
        other = ksd.diffusion.kernel_distance(a, b + 0.5, subset_size=400)
        self.assertLess(abs(same), 0.02)
        self.assertGreater(other, 10 * abs(same))


class ClassEntropyTest(parameterized.TestCase):
    def test_entropy_of_the_predicted_classes(self):
        logits = np.eye(4)[[0, 0, 1, 3]] * 5
        expected = -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25))
        self.assertAlmostEqual(
            ksd.diffusion.class_entropy(logits), expected, places=12
        )
        self.assertEqual(ksd.diffusion.class_entropy(np.eye(3)[[1, 1]]), 0.0)
        with self.assertRaisesRegex(ValueError, "classes"):
            ksd.diffusion.class_entropy(np.ones(3))
