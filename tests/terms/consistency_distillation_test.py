import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests.diffusion import consistency_reference as reference
from tests.diffusion import reference as ddim_reference


def _images(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(n, 8, 8, 1)).astype("float32")


def _distiller(distance="l2", lr=0.0, num_scales=6, momentum=0.95):
    teacher = ddim_reference.unet(keras, ksd, seed=1)
    term = ksd.terms.ConsistencyDistillation(
        teacher,
        num_scales=num_scales,
        target=ksd.teachers.EMA(momentum),
        distance=distance,
        seed=4,
    )
    distiller = ksd.Distiller(ddim_reference.unet(keras, ksd, seed=2), [term])
    distiller.compile(optimizer=keras.optimizers.SGD(lr))
    return distiller


def _check_fit_loss(test, distance):
    # A zero learning rate: the History's loss is the first step's, on
    # the noise and steps the term draws; the same seed drawn eagerly
    # gives them, and numpy recomputes the loss, its Heun step and its
    # target network (the student's initial weights) from them.
    distiller = _distiller(distance)
    images = _images()
    probe = _distiller(distance).terms[0]
    probe._bind(distiller)
    _, labels, _ = probe.rewrite_batch(images, None, None)
    noisy, sigma = (
        np.float64(keras.ops.convert_to_numpy(labels[k]))
        for k in ("x", "sigma")
    )
    grid = reference.sigmas(6)
    n = np.argmin(np.abs(np.log(sigma[:, None] / grid[None, :])), axis=1)
    np.testing.assert_allclose(sigma, grid[n], rtol=1e-5)
    test.assertTrue(np.all(n <= 4))
    eps = (noisy - images) / sigma[:, None, None, None]
    initial = keras.models.clone_model(distiller.student)
    initial.set_weights(distiller.student.get_weights())
    teacher = distiller.terms[0].teacher.model
    expected = reference.loss(
        initial, initial, teacher, images, eps, n, grid, distance
    ).mean()
    history = distiller.fit(
        images, batch_size=8, epochs=1, shuffle=False, verbose=0
    )
    test.assertAlmostEqual(
        history.history["consistency_distillation_loss"][0],
        expected,
        delta=1e-4 * max(1.0, expected),
    )


class ConsistencyDistillationTest(parameterized.TestCase):
    def test_config(self):
        term = ksd.terms.ConsistencyDistillation(
            ddim_reference.unet(keras, ksd, seed=1),
            num_scales=10,
            target=ksd.teachers.EMA(0.9),
            distance="pseudo_huber",
            sigma_range=(0.01, 40.0),
            seed=3,
            weight=0.5,
        )
        restored = ksd.terms.ConsistencyDistillation.from_config(
            term.get_config()
        )
        self.assertEqual(restored.num_scales, 10)
        self.assertEqual(restored.distance, "pseudo_huber")
        self.assertEqual(restored.sigma_range, (0.01, 40.0))
        self.assertEqual(restored.seed, 3)
        self.assertEqual(restored.weight, 0.5)
        self.assertEqual(restored.target.momentum, 0.9)
        self.assertIsInstance(restored.teacher, ksd.teachers.FrozenModel)

    def test_noise_levels_are_edm_s(self):
        term = ksd.terms.ConsistencyDistillation(
            ddim_reference.unet(keras, ksd, seed=1)
        )
        np.testing.assert_allclose(term.sigmas, reference.sigmas(18))
        self.assertAlmostEqual(term.sigmas[0], 80.0)
        self.assertAlmostEqual(term.sigmas[-1], 0.002)

    def test_fit_loss_matches_numpy(self):
        _check_fit_loss(self, "l2")

    def test_boundary_condition(self):
        # f(x, σ_min) = x whatever the network says: c_skip = 1, c_out = 0.
        model = ddim_reference.unet(keras, ksd, seed=1)
        x = _images(4)
        out = reference.consistency(model, np.float64(x), 0.002)
        np.testing.assert_allclose(out, x, atol=1e-6)
        term = ksd.terms.ConsistencyDistillation(model)
        labels = {
            "x": x,
            "sigma": np.full((4,), 0.002, "float32"),
            "target": x,
        }
        v = np.random.default_rng(0).normal(size=x.shape).astype("float32")
        loss = keras.ops.convert_to_numpy(term.per_sample_loss(labels, v))
        np.testing.assert_allclose(loss, 0.0, atol=1e-10)

    def test_refusals(self):
        teacher = ddim_reference.unet(keras, ksd, seed=1)
        with self.assertRaisesRegex(TypeError, "frozen diffusion model"):
            ksd.terms.ConsistencyDistillation("unet")
        with self.assertRaisesRegex(ValueError, "num_scales"):
            ksd.terms.ConsistencyDistillation(teacher, num_scales=1)
        with self.assertRaisesRegex(ValueError, "distance"):
            ksd.terms.ConsistencyDistillation(teacher, distance="lpips")
        with self.assertRaisesRegex(ValueError, "never trained"):
            ksd.terms.ConsistencyDistillation(teacher, sigma_range=(0.002, 1e5))
        with self.assertRaisesRegex(ValueError, "sigma_min < sigma_max"):
            ksd.terms.ConsistencyDistillation(teacher, sigma_range=(1.0, 0.5))
        with self.assertRaisesRegex(TypeError, "EMA"):
            ksd.terms.ConsistencyDistillation(
                teacher, target=ksd.teachers.FrozenModel(teacher)
            )
        with self.assertRaisesRegex(ValueError, "two inputs"):
            ksd.Distiller(
                keras.Sequential(
                    [keras.Input((8, 8, 1)), keras.layers.Dense(1)]
                ),
                [ksd.terms.ConsistencyDistillation(teacher)],
            )
        other = ksd.diffusion.unet((16, 16, 1), widths=(4, 8))
        with self.assertRaisesRegex(ValueError, "outputs differ"):
            ksd.Distiller(other, [ksd.terms.ConsistencyDistillation(teacher)])
        with self.assertRaisesRegex(ValueError, "images alone"):
            _distiller().fit(_images(), np.zeros(8), epochs=1, verbose=0)
        with self.assertRaisesRegex(ValueError, "image / 127.5 - 1"):
            _distiller().fit((_images() + 1) * 127.5, epochs=1, verbose=0)


# Within make test's budget: the pseudo-Huber loss in fit and the target
# network's update run in the slow tier, which CI also runs.
@pytest.mark.slow
class ConsistencyDistillationSlowTest(parameterized.TestCase):
    def test_pseudo_huber_fit_loss_matches_numpy(self):
        _check_fit_loss(self, "pseudo_huber")

    def test_the_target_network_follows_the_student(self):
        distiller = _distiller(lr=0.05, momentum=0.5)
        start = [np.copy(w) for w in distiller.student.get_weights()]
        teacher = distiller.terms[0].teacher.model
        frozen = [np.copy(w) for w in teacher.get_weights()]
        distiller.fit(_images(), batch_size=8, epochs=1, verbose=0)
        target = distiller.terms[0].target.model.get_weights()
        after = distiller.student.get_weights()
        for a, b, c in zip(start, after, target):
            np.testing.assert_allclose(c, 0.5 * a + 0.5 * b, atol=1e-6)
        self.assertGreater(
            max(np.abs(a - b).max() for a, b in zip(start, after)), 0
        )
        for a, b in zip(frozen, teacher.get_weights()):
            np.testing.assert_array_equal(a, b)


class ConsistencySampleTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("one_step", (80.0,)), ("two_steps", (80.0, 0.821))
    )
    def test_matches_numpy(self, levels):
        model = ddim_reference.unet(keras, ksd, seed=1)
        noise = np.random.default_rng(0).normal(size=(6, 8, 8, 1))
        samples = ksd.diffusion.consistency_sample(
            model, noise, sigmas=levels, seed=5, batch_size=4
        )
        rng = np.random.default_rng(5)
        extra = [rng.standard_normal(noise.shape) for _ in levels[1:]]
        expected = reference.multistep(
            model, noise.astype("float32"), levels, extra
        )
        np.testing.assert_allclose(samples, expected, atol=1e-5)

    def test_refusals(self):
        model = ddim_reference.unet(keras, ksd, seed=1)
        noise = np.zeros((2, 8, 8, 1))
        with self.assertRaisesRegex(ValueError, "strictly decreasing"):
            ksd.diffusion.consistency_sample(model, noise, sigmas=(1.0, 2.0))
        with self.assertRaisesRegex(ValueError, "strictly decreasing"):
            ksd.diffusion.consistency_sample(model, noise, sigmas=())
