import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests.diffusion import reference


def _images(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(n, 8, 8, 1)).astype("float32")


def _weight(lam, weighting):
    snr = np.exp(lam)
    return {
        "truncated_snr": np.maximum(snr, 1),
        "snr_plus_one": 1 + snr,
        "snr": snr,
        "constant": np.ones_like(snr),
    }[weighting]


def _distiller(teacher_steps=None, weighting="truncated_snr", lr=0.0):
    teacher = None
    if teacher_steps:
        teacher = ksd.teachers.DDIM(
            reference.unet(keras, ksd, seed=1), num_steps=teacher_steps
        )
    term = ksd.terms.Denoising(teacher, weighting=weighting, seed=4)
    distiller = ksd.Distiller(reference.unet(keras, ksd, seed=2), [term])
    distiller.compile(optimizer=keras.optimizers.SGD(lr))
    return distiller


def _check_fit_loss(test, teacher_steps, weighting):
    # A zero learning rate: the History's loss is the loss of the
    # initial weights on the batch the term draws; the same seed drawn
    # eagerly gives that batch, and numpy recomputes the loss from it.
    distiller = _distiller(teacher_steps, weighting)
    images = _images()
    probe = _distiller(teacher_steps, weighting).terms[0]
    probe._bind(distiller)
    (z, lam), labels, _ = probe.rewrite_batch(images, None, None)
    z, lam = (np.float64(keras.ops.convert_to_numpy(v)) for v in (z, lam))
    if teacher_steps is None:
        target = np.float64(images)
        test.assertTrue(np.all((lam >= -20) & (lam <= 20)))
    else:
        # The student's step i from its time t = (i + 1) / 2, read
        # back from λ(t).
        times = reference.logsnr(np.arange(1, 3) / 2)
        i = np.argmin(np.abs(lam[:, None] - times[None, :]), axis=1)
        np.testing.assert_allclose(lam, times[i], atol=1e-4)
        target, _ = reference.teacher_target(
            distiller.terms[0].teacher.model, z, i, 2
        )
    history = distiller.fit(
        images, batch_size=8, epochs=1, shuffle=False, verbose=0
    )
    v = np.float64(keras.ops.convert_to_numpy(distiller.student([z, lam])))
    alpha, sigma = reference.alpha_sigma(lam[:, None, None, None])
    x = alpha * z - sigma * v
    error = np.mean((x - target) ** 2, axis=(1, 2, 3))
    expected = np.mean(_weight(lam, weighting) * error)
    test.assertAlmostEqual(
        history.history["denoising_loss"][0],
        expected,
        delta=1e-4 * max(1.0, expected),
    )


class DenoisingTest(parameterized.TestCase):
    def test_config(self):
        term = ksd.terms.Denoising(
            ksd.teachers.DDIM(reference.unet(keras, ksd, seed=1), 4),
            weighting="snr_plus_one",
            seed=3,
            weight=0.5,
        )
        restored = ksd.terms.Denoising.from_config(term.get_config())
        self.assertEqual(restored.weighting, "snr_plus_one")
        self.assertEqual(restored.seed, 3)
        self.assertEqual(restored.weight, 0.5)
        self.assertIsInstance(restored.teacher, ksd.teachers.DDIM)
        self.assertEqual(restored.teacher.num_steps, 4)

    @parameterized.named_parameters(
        ("truncated_snr_teacher", 4, "truncated_snr"),
        ("snr_data", None, "snr"),
    )
    def test_fit_loss_matches_numpy(self, teacher_steps, weighting):
        _check_fit_loss(self, teacher_steps, weighting)

    def test_sample_weights_weigh_the_samples(self):
        term = ksd.terms.Denoising(seed=0)
        y = {
            "z": np.zeros((2, 2, 2, 1), "float32"),
            "logsnr": np.zeros((2,), "float32"),
            "target": np.stack([np.ones((2, 2, 1)), 2 * np.ones((2, 2, 1))]),
        }
        # λ = 0: α = σ = √½, v = 0 gives x̂ = 0; errors 1 and 4.
        v = np.zeros((2, 2, 2, 1), "float32")
        loss = term.compute_loss(None, y, v, np.array([3.0, 1.0]), 0, 0)
        self.assertAlmostEqual(float(loss), (3 * 1 + 1 * 4) / 2, places=5)

    @parameterized.named_parameters(
        ("truncated_snr", "truncated_snr"), ("snr_plus_one", "snr_plus_one")
    )
    def test_finite_at_both_ends_of_time(self, weighting):
        term = ksd.terms.Denoising(weighting=weighting)
        lam = keras.ops.convert_to_numpy(
            term.schedule(np.array([0.0, 1.0], "float32"))
        )
        rng = np.random.default_rng(0)
        y = {
            "z": rng.normal(size=(2, 4, 4, 1)).astype("float32"),
            "logsnr": lam,
            "target": rng.uniform(-1, 1, size=(2, 4, 4, 1)).astype("float32"),
        }
        v = rng.normal(size=(2, 4, 4, 1)).astype("float32")
        per_sample = keras.ops.convert_to_numpy(term.per_sample_loss(y, v))
        self.assertTrue(np.all(np.isfinite(per_sample)), per_sample)
        self.assertTrue(np.all(per_sample > 0))
        teacher = ksd.teachers.DDIM(reference.unet(keras, ksd, seed=1), 8)
        z = rng.normal(size=(2, 8, 8, 1)).astype("float32")
        # The student's first and last steps: t = 1 and t = 1/4 → s = 0.
        target = keras.ops.convert_to_numpy(
            teacher.denoising_targets(z, np.array([3, 0]))
        )
        self.assertTrue(np.all(np.isfinite(target)))

    @pytest.mark.slow  # the fast tier's CPU budget
    def test_teacher_stays_frozen_inside_fit(self):
        distiller = _distiller(teacher_steps=4, lr=0.05)
        teacher = distiller.terms[0].teacher.model
        before = [np.copy(w) for w in teacher.get_weights()]
        student_before = [np.copy(w) for w in distiller.student.get_weights()]
        distiller.fit(_images(16), batch_size=8, epochs=2, verbose=0)
        for a, b in zip(before, teacher.get_weights()):
            np.testing.assert_array_equal(a, b)
        moved = [
            np.abs(a - b).max()
            for a, b in zip(student_before, distiller.student.get_weights())
        ]
        self.assertGreater(max(moved), 0)

    def test_refusals(self):
        distiller = _distiller()
        images = _images()
        with self.assertRaisesRegex(ValueError, "no validation loss"):
            distiller.fit(images, validation_data=images, verbose=0)
        with self.assertRaisesRegex(ValueError, "no validation loss"):
            distiller.evaluate(images, verbose=0)
        with self.assertRaisesRegex(ValueError, "integer"):
            # A fresh distiller: JAX leaves one whose step failed while
            # tracing unusable.
            _distiller().fit(
                (images * 100).astype("uint8"), epochs=1, verbose=0
            )
        with self.assertRaisesRegex(ValueError, "images alone"):
            distiller.fit(images, np.zeros(8), epochs=1, verbose=0)
        labelled = _distiller()
        labelled.compile(optimizer="sgd", loss="mse")
        with self.assertRaisesRegex(ValueError, "without `loss`"):
            labelled.fit(images, epochs=1, verbose=0)
        with self.assertRaisesRegex(ValueError, "two inputs"):
            ksd.Distiller(
                keras.Sequential(
                    [keras.Input((8, 8, 1)), keras.layers.Dense(1)]
                ),
                [ksd.terms.Denoising()],
            )
        with self.assertRaisesRegex(ValueError, "weighting"):
            ksd.terms.Denoising(weighting="v")
        with self.assertRaisesRegex(TypeError, "seed"):
            ksd.terms.Denoising(seed=1.5)
        teacher = ksd.teachers.DDIM(reference.unet(keras, ksd, seed=1), 4)
        with self.assertRaisesRegex(ValueError, "differs from its teacher"):
            ksd.terms.Denoising(
                teacher, schedule=ksd.diffusion.CosineSchedule(-10.0, 10.0)
            )

    def test_images_outside_minus_one_to_one_are_refused(self):
        import tensorflow as tf

        pixels = (_images() + 1.0) * 127.5
        for data in (
            pixels,
            tf.data.Dataset.from_tensor_slices(pixels).batch(4),
        ):
            with self.assertRaisesRegex(
                ValueError, r"spans \[\d.*, 2\d\d.*\].*image / 127.5 - 1"
            ):
                _distiller().fit(data, epochs=1, verbose=0)
        with self.assertRaisesRegex(ValueError, "range linearly onto"):
            _distiller().fit(_images() * 1.5, epochs=1, verbose=0)
        # Images in [0, 1] are in range (and indistinguishable).
        _distiller().fit((_images() + 1.0) / 2.0, epochs=1, verbose=0)

    @pytest.mark.slow  # the fast tier's CPU budget
    def test_seed_state_is_saved(self):
        distiller = _distiller(teacher_steps=4)
        distiller.fit(_images(), batch_size=4, epochs=1, verbose=0)
        state = distiller.terms[0].seed_generator.state
        path = self.create_tempdir().full_path + "/d.weights.h5"
        distiller.save_weights(path)
        restored = _distiller(teacher_steps=4)
        restored.load_weights(path)
        np.testing.assert_array_equal(
            restored.terms[0].seed_generator.state, state
        )
        # Two draws per step (noise and times), two steps.
        self.assertEqual(int(keras.ops.convert_to_numpy(state)[1]), 4)


# The other weightings: the slow tier (the fast tier's CPU budget).
@pytest.mark.slow
class DenoisingSlowTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("truncated_snr_data", None, "truncated_snr"),
        ("snr_plus_one_teacher", 4, "snr_plus_one"),
        ("constant_teacher", 4, "constant"),
    )
    def test_fit_loss_matches_numpy(self, teacher_steps, weighting):
        _check_fit_loss(self, teacher_steps, weighting)
