import keras
import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests.diffusion import reference


class SampleTest(parameterized.TestCase):
    @parameterized.product(num_steps=[1, 2, 5], clip=[True, False])
    def test_matches_a_numpy_ddim_sampler(self, num_steps, clip):
        model = reference.unet(keras, ksd, seed=1)
        noise = np.random.default_rng(0).normal(size=(6, 8, 8, 1))
        got = ksd.diffusion.sample(model, noise, num_steps, clip=clip)
        expected = reference.ddim_sample(model, noise, num_steps, clip=clip)
        self.assertEqual(got.dtype, np.float32)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        if clip:
            self.assertLessEqual(np.abs(got).max(), 1.0)

    def test_batches_do_not_change_the_samples(self):
        model = reference.unet(keras, ksd, seed=1)
        noise = np.random.default_rng(0).normal(size=(7, 8, 8, 1))
        whole = ksd.diffusion.sample(model, noise, 3, batch_size=7)
        pieces = ksd.diffusion.sample(model, noise, 3, batch_size=3)
        # Float32 rounding only: XLA's CPU convolutions sum in an order
        # that depends on the batch size (up to 6.5e-5 apart on JAX after
        # 3 steps); a sample paired with another's noise would be O(1).
        np.testing.assert_allclose(whole, pieces, atol=2e-4)

    def test_bad_arguments(self):
        model = reference.unet(keras, ksd, seed=1)
        noise = np.zeros((2, 8, 8, 1))
        with self.assertRaisesRegex(ValueError, "num_steps=0"):
            ksd.diffusion.sample(model, noise, 0)
        with self.assertRaisesRegex(ValueError, "batch_size=2.5"):
            ksd.diffusion.sample(model, noise, 2, batch_size=2.5)
