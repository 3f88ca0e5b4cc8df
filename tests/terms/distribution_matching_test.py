import os
import tempfile

import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny
from tests.diffusion import consistency_reference
from tests.diffusion import dmd_reference as reference
from tests.diffusion import reference as ddim_reference


def _noise(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8, 8, 1)).astype("float32")


def _term(**kwargs):
    kwargs.setdefault("fake_optimizer", keras.optimizers.SGD(0.0))
    kwargs.setdefault("fake_updates", 1)
    return ksd.terms.DistributionMatching(
        ddim_reference.unet(keras, ksd, seed=1), seed=4, **kwargs
    )


def _distiller(lr=0.0, **kwargs):
    distiller = ksd.Distiller(
        ddim_reference.unet(keras, ksd, seed=2), [_term(**kwargs)]
    )
    distiller.compile(optimizer=keras.optimizers.SGD(lr))
    return distiller


def _copy(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _draws(distiller, noise, targets=None):
    """What one step draws, in its order, from a probe term with the same
    seed: the generator loss's noise and levels (`rewrite_batch`), then
    each fake update's noise, level and noise (`train_own`)."""
    term = distiller.terms[0]
    probe = _term(
        regression_weight=term.regression_weight,
        fake_updates=term.fake_updates,
    )
    probe._bind(distiller)
    _, labels, _ = probe.rewrite_batch(noise, targets, None)
    numpy = keras.ops.convert_to_numpy
    shape = noise.shape
    fake = []
    for _ in range(term.fake_updates):
        start = numpy(probe._normal(shape))
        sigma = numpy(probe._levels(shape[0], 0, term.num_train_timesteps))
        eps = numpy(probe._normal(shape))
        fake.append(tuple(np.float64(v) for v in (start, sigma, eps)))
    generator = tuple(np.float64(numpy(labels[k])) for k in ("noise", "sigma"))
    return generator, fake


def _fake_loss(model, weights, samples, sigma, eps):
    model.set_weights(weights)
    return reference.fake_loss(model, samples, eps, sigma).mean()


def _check_one_step(test, regression_weight):
    # The generator does not move (learning rate 0); the fake score
    # makes one SGD update before the generator's loss is computed.
    distiller = _distiller(
        fake_optimizer=keras.optimizers.SGD(0.05),
        regression_weight=regression_weight,
    )
    term = distiller.terms[0]
    # The distiller's optimizer trains the generator alone.
    test.assertEqual(
        {id(v) for v in distiller.trainable_variables},
        {id(v) for v in distiller.student.trainable_variables},
    )
    noise = _noise()
    targets = None
    if regression_weight:
        targets = np.tanh(_noise(seed=1))
    (eps, sigma), [(start, fake_sigma, fake_eps)] = _draws(
        distiller, noise, targets
    )
    generator = _copy(distiller.student)
    teacher = term.teacher.model
    teacher_before = [w.copy() for w in teacher.get_weights()]
    before = [w.copy() for w in term.fake_score.get_weights()]
    history = distiller.fit(
        noise, targets, batch_size=8, epochs=1, shuffle=False, verbose=0
    ).history
    after = [w.copy() for w in term.fake_score.get_weights()]
    test.assertEqual(
        int(keras.ops.convert_to_numpy(term.fake_optimizer.iterations)), 1
    )
    for a, b in zip(teacher_before, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    fake = _copy(term.fake_score)

    # The fake score's loss, on the generator's samples from the drawn
    # noise, before its update.
    samples = consistency_reference.denoiser(generator, start * 80, 80.0)
    expected_fake = _fake_loss(fake, before, samples, fake_sigma, fake_eps)
    test.assertAlmostEqual(
        history["distribution_matching_fake_loss"][0],
        expected_fake,
        delta=1e-4 * max(1.0, expected_fake),
    )
    # Its update is a gradient step on that loss: along the update
    # d = −0.05·g, the loss's slope is g·d/|d| = −|d|/0.05.
    move = [a - b for a, b in zip(after, before)]
    norm = np.sqrt(sum((m.astype("float64") ** 2).sum() for m in move))
    test.assertGreater(norm, 1e-4)
    h = 1e-2
    ends = [
        _fake_loss(
            fake,
            [b + sign * h * m / norm for b, m in zip(before, move)],
            samples,
            fake_sigma,
            fake_eps,
        )
        for sign in (1.0, -1.0)
    ]
    slope = (ends[0] - ends[1]) / (2 * h)
    np.testing.assert_allclose(slope, -norm / 0.05, rtol=2e-2)

    # The generator's loss against the updated fake score.
    fake.set_weights(after)
    images = reference.generate(generator, noise)
    expected = reference.generator_loss(teacher, fake, images, eps, sigma)
    if regression_weight:
        expected = expected + regression_weight * (
            (images - targets) ** 2
        ).mean(axis=(1, 2, 3))
    expected = expected.mean()
    test.assertGreater(expected, 1e-6)
    test.assertAlmostEqual(
        history["distribution_matching_loss"][0],
        expected,
        delta=1e-3 * max(1.0, expected),
    )


class DistributionMatchingTest(parameterized.TestCase):
    def test_config(self):
        term = _term(
            fake_optimizer=keras.optimizers.Adam(3e-4),
            fake_updates=3,
            sigma_range=(0.01, 40.0),
            num_train_timesteps=500,
            min_step_percent=0.1,
            max_step_percent=0.9,
            regression_weight=0.25,
            weight=0.5,
        )
        restored = ksd.terms.DistributionMatching.from_config(term.get_config())
        self.assertEqual(restored.fake_updates, 3)
        self.assertEqual(restored.sigma_range, (0.01, 40.0))
        self.assertEqual(restored.num_train_timesteps, 500)
        self.assertEqual(restored.min_step_percent, 0.1)
        self.assertEqual(restored.max_step_percent, 0.9)
        self.assertEqual(restored.regression_weight, 0.25)
        self.assertEqual(restored.seed, 4)
        self.assertEqual(restored.weight, 0.5)
        self.assertIsInstance(restored.fake_optimizer, keras.optimizers.Adam)
        self.assertAlmostEqual(
            float(restored.fake_optimizer.learning_rate), 3e-4, places=7
        )
        self.assertIsInstance(restored.teacher, ksd.teachers.FrozenModel)

    def test_levels_are_the_official_grid(self):
        term = _term()
        np.testing.assert_allclose(term.sigmas, reference.levels())
        self.assertAlmostEqual(term.sigmas[0], 0.002)
        self.assertAlmostEqual(term.sigmas[-1], 80.0)
        # randint(min_step, min(max_step + 1, N)) of the official code.
        self.assertEqual(term._dm_steps, (20, 981))

    def test_one_step_matches_numpy(self):
        _check_one_step(self, regression_weight=0.0)

    def test_generator_gradient_is_dmd_s(self):
        # d loss / d velocity = −c_out(σ_max)·grad / pixels per sample:
        # the stop-gradient form passes DMD's `grad` to the generator.
        term = _term()
        fake = _copy(term.teacher.model)
        layer = fake.get_layer("velocity")
        layer.kernel.assign(layer.kernel * 1.5)
        term.fake_score.set_weights(fake.get_weights())
        noise = _noise()
        rng = np.random.default_rng(5)
        eps = rng.normal(size=noise.shape)
        sigma = reference.levels()[[30, 200, 500, 700, 800, 900, 950, 980]]
        velocity = rng.normal(size=noise.shape).astype("float32")
        start = np.float64(noise) * 80.0
        labels = {
            "x": start.astype("float32"),
            "noise": eps.astype("float32"),
            "sigma": sigma.astype("float32"),
        }
        got = _gradient(
            lambda v: keras.ops.sum(term.per_sample_loss(labels, v)),
            velocity,
        )
        c_skip, c_out = 1 / (1 + 80.0**2), 80.0 / np.sqrt(1 + 80.0**2)
        images = c_skip * start - c_out * np.float64(velocity)
        grad = reference.generator_gradient(
            term.teacher.model, fake, images, eps, sigma
        )
        expected = -c_out * grad / np.prod(noise.shape[1:])
        self.assertGreater(np.abs(expected).max(), 1e-4)
        np.testing.assert_allclose(
            got, expected, atol=2e-4 * np.abs(expected).max()
        )

    @tiny.ONCE
    def test_refusals(self):
        teacher = ddim_reference.unet(keras, ksd, seed=1)
        with self.assertRaisesRegex(TypeError, "frozen diffusion model"):
            ksd.terms.DistributionMatching("unet")
        with self.assertRaisesRegex(ValueError, "fake_updates"):
            ksd.terms.DistributionMatching(teacher, fake_updates=0)
        with self.assertRaisesRegex(ValueError, "max_step_percent"):
            ksd.terms.DistributionMatching(
                teacher, min_step_percent=0.9, max_step_percent=0.1
            )
        with self.assertRaisesRegex(ValueError, "never trained"):
            ksd.terms.DistributionMatching(teacher, sigma_range=(0.002, 1e5))
        with self.assertRaisesRegex(ValueError, "regression_weight"):
            ksd.terms.DistributionMatching(teacher, regression_weight=-1.0)
        with self.assertRaisesRegex(TypeError, "fake_score"):
            ksd.terms.DistributionMatching(teacher, fake_score="unet")
        other = ksd.diffusion.unet((16, 16, 1), widths=(4, 8))
        with self.assertRaisesRegex(ValueError, "outputs differ"):
            ksd.Distiller(other, [ksd.terms.DistributionMatching(teacher)])
        with self.assertRaisesRegex(ValueError, "fake score output"):
            ksd.Distiller(
                ddim_reference.unet(keras, ksd, seed=2),
                [ksd.terms.DistributionMatching(teacher, fake_score=other)],
            )
        frozen = _copy(teacher)
        frozen.trainable = False
        with self.assertRaisesRegex(ValueError, "no trainable weights"):
            ksd.Distiller(
                ddim_reference.unet(keras, ksd, seed=2),
                [ksd.terms.DistributionMatching(teacher, fake_score=frozen)],
            )
        with self.assertRaisesRegex(ValueError, "two inputs"):
            ksd.Distiller(
                keras.Sequential(
                    [keras.Input((8, 8, 1)), keras.layers.Dense(1)]
                ),
                [ksd.terms.DistributionMatching(teacher)],
            )

    # The refusals that need a fit: the slow tier (the fast tier's CPU
    # budget).
    @pytest.mark.slow
    @tiny.ONCE
    def test_refusals_in_fit(self):
        teacher = ddim_reference.unet(keras, ksd, seed=1)
        untrained = ksd.Distiller(
            ddim_reference.unet(keras, ksd, seed=2),
            [
                ksd.terms.DistributionMatching(
                    teacher, fake_score=ddim_reference.unet(keras, ksd, seed=3)
                )
            ],
        )
        untrained.compile(optimizer="sgd")
        with self.assertRaisesRegex(ValueError, "must start as the teacher"):
            untrained.fit(_noise(8), batch_size=8, verbose=0)
        distiller = _distiller()
        with self.assertRaisesRegex(ValueError, "like images"):
            distiller.fit(np.tanh(_noise(8)), batch_size=8, verbose=0)
        with self.assertRaisesRegex(ValueError, "targets would be ignored"):
            distiller.fit(_noise(8), _noise(8), batch_size=8, verbose=0)
        with self.assertRaisesRegex(ValueError, r"pairs `\(noise, image\)`"):
            _distiller(regression_weight=0.25).fit(
                _noise(8), batch_size=8, verbose=0
            )
        with self.assertRaisesRegex(ValueError, "evaluate"):
            distiller.evaluate(_noise(8), verbose=0)


# The regression variant and a saved distiller: the slow tier.
@pytest.mark.slow
class DistributionMatchingSlowTest(parameterized.TestCase):
    def test_one_step_with_dmd_regression_matches_numpy(self):
        _check_one_step(self, regression_weight=0.25)

    # Saving is Keras's on either backend (the resume harness restores
    # the fake score and its optimizer on both): once.
    @tiny.ONCE
    def test_saved_distiller_carries_the_fake_score_and_its_optimizer(self):
        distiller = _distiller(
            lr=0.01, fake_optimizer=keras.optimizers.Adam(0.01), fake_updates=2
        )
        distiller.fit(_noise(16), batch_size=8, epochs=1, verbose=0)
        path = os.path.join(tempfile.mkdtemp(), "dmd.keras")
        distiller.save(path)
        loaded = keras.saving.load_model(path)
        term, other = distiller.terms[0], loaded.terms[0]
        for a, b in zip(term.fake_score.weights, other.fake_score.weights):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
            )
        self.assertLen(
            other.fake_optimizer.variables, len(term.fake_optimizer.variables)
        )
        for a, b in zip(
            term.fake_optimizer.variables, other.fake_optimizer.variables
        ):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
            )
        self.assertEqual(
            int(keras.ops.convert_to_numpy(other.fake_optimizer.iterations)), 4
        )


def _gradient(function, value):
    if keras.backend.backend() == "jax":
        import jax

        return np.asarray(jax.grad(function)(value), "float64")
    import tensorflow as tf

    value = tf.constant(value)
    with tf.GradientTape() as tape:
        tape.watch(value)
        out = function(value)
    return np.asarray(tape.gradient(out, value), "float64")
