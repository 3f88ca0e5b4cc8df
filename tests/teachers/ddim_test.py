import keras
import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests.diffusion import reference


def _teacher(num_steps=8, seed=1):
    return ksd.teachers.DDIM(
        reference.unet(keras, ksd, seed=seed), num_steps=num_steps
    )


def _noisy(n=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 1))


class DDIMTest(parameterized.TestCase):
    def test_config(self):
        teacher = ksd.teachers.DDIM(
            reference.unet(keras, ksd, seed=1),
            num_steps=6,
            schedule=ksd.diffusion.CosineSchedule(-10.0, 10.0),
        )
        restored = ksd.teachers.DDIM.from_config(teacher.get_config())
        self.assertEqual(restored.num_steps, 6)
        self.assertEqual(restored.student_steps, 3)
        self.assertEqual(restored.schedule.logsnr_min, -10.0)
        self.assertFalse(restored.model.trainable)

    @parameterized.named_parameters(("4_steps", 4), ("16_steps", 16))
    def test_targets_match_a_numpy_two_step_reference(self, num_steps):
        teacher = _teacher(num_steps)
        steps = num_steps // 2
        z = _noisy(2 * steps)
        i = np.arange(2 * steps) % steps
        got = keras.ops.convert_to_numpy(teacher.denoising_targets(z, i))
        expected, _ = reference.teacher_target(teacher.model, z, i, steps)
        self.assertEqual(got.dtype, np.float32)
        scale = np.abs(expected).max()
        # The model sees float32 log-SNRs computed in float32 here and in
        # float64 there: one ulp of λ moves the sinusoids' fastest angles
        # (up to 1000 radians) by ~1e-4, and the targets by ~1e-5 of
        # their scale (4.1e-5 of 3.6 at the oldest tested TensorFlow).
        np.testing.assert_allclose(got, expected, rtol=0, atol=5e-5 * scale)

    def test_one_student_step_lands_on_the_teachers_two_steps(self):
        teacher = _teacher(8)
        z = _noisy(8)
        i = np.arange(8) % 4
        target = np.float64(
            keras.ops.convert_to_numpy(teacher.denoising_targets(z, i))
        )
        expected, z_teacher = reference.teacher_target(teacher.model, z, i, 4)
        # The student's DDIM step from z_t with x̂ = target: ε̂ from x̂
        # (the official predict_eps_from_x), then z_s = α_s x̂ + σ_s ε̂.
        lam_t = reference.logsnr((i + 1) / 4)[:, None, None, None]
        lam_s = reference.logsnr(i / 4)[:, None, None, None]
        alpha_t, sigma_t = reference.alpha_sigma(lam_t)
        alpha_s, sigma_s = reference.alpha_sigma(lam_s)
        eps = (z - alpha_t * target) / sigma_t
        z_student = alpha_s * target + sigma_s * eps
        later = i > 0
        np.testing.assert_allclose(
            z_student[later], z_teacher[later], rtol=0, atol=1e-4
        )
        # The last step (to s = 0) returns x̂: the teacher's x̂ after its
        # second step, not z_s = α_s·x̂ + σ_s·ε̂ (σ_s = 4.5e-5 at λ = 20).
        np.testing.assert_allclose(
            target[~later], expected[~later], rtol=0, atol=1e-5
        )

    def test_is_not_a_logits_teacher(self):
        with self.assertRaisesRegex(TypeError, "not logits"):
            _teacher().targets(np.zeros((1, 8, 8, 1)), None, 1.0)
        with self.assertRaisesRegex(TypeError, "DDIM"):
            ksd.terms.Denoising(
                ksd.teachers.FrozenModel(
                    reference.unet(keras, ksd, seed=1), from_logits=None
                )
            )

    def test_bad_arguments(self):
        model = reference.unet(keras, ksd, seed=1)
        with self.assertRaisesRegex(ValueError, "must be even"):
            ksd.teachers.DDIM(model, num_steps=5)
        with self.assertRaisesRegex(ValueError, "positive int"):
            ksd.teachers.DDIM(model, num_steps=0)
        with self.assertRaisesRegex(TypeError, "CosineSchedule"):
            ksd.teachers.DDIM(model, num_steps=4, schedule="cosine")
