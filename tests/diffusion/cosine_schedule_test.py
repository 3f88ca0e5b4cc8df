import keras
import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests.diffusion import reference


class CosineScheduleTest(parameterized.TestCase):
    def test_config(self):
        schedule = ksd.diffusion.CosineSchedule(-15.0, 12.0)
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(schedule)
        )
        self.assertEqual(restored.get_config(), schedule.get_config())

    @parameterized.named_parameters(
        ("default", -20.0, 20.0), ("narrow", -5.0, 8.0)
    )
    def test_matches_the_official_formula_in_float64(self, low, high):
        t = np.linspace(0, 1, 101)
        got = keras.ops.convert_to_numpy(
            ksd.diffusion.CosineSchedule(low, high)(t.astype("float32"))
        )
        expected = reference.logsnr(t.astype("float32"), low, high)
        # Written from the nearer end, float32 resolves both ends: the
        # angle's form alone is off by 2e-3 at t = 1.
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        self.assertAlmostEqual(float(got[0]), high, places=4)
        self.assertAlmostEqual(float(got[-1]), low, places=4)
        self.assertTrue(np.all(np.diff(got) < 0))

    def test_default_is_the_truncated_cosine(self):
        # α_t = cos(πt/2) away from the ends: α² = sigmoid(λ).
        t = np.array([0.25, 0.5, 0.75], "float32")
        lam = keras.ops.convert_to_numpy(ksd.diffusion.CosineSchedule()(t))
        np.testing.assert_allclose(
            np.sqrt(reference.sigmoid(lam)), np.cos(np.pi * t / 2), atol=1e-4
        )

    def test_bad_bounds(self):
        with self.assertRaisesRegex(ValueError, "must be below"):
            ksd.diffusion.CosineSchedule(5.0, -5.0)
        with self.assertRaisesRegex(TypeError, "finite number"):
            ksd.diffusion.CosineSchedule(float("nan"), 1.0)
        with self.assertRaisesRegex(TypeError, "finite number"):
            ksd.diffusion.CosineSchedule(True, 3.0)
