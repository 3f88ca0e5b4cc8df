import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests.diffusion import reference


def _pairs(n=8, seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(n, 8, 8, 1)).astype("float32")
    images = rng.uniform(-1, 1, size=(n, 8, 8, 1)).astype("float32")
    return noise, images


def _distiller(lr=0.0):
    distiller = ksd.Distiller(
        reference.unet(keras, ksd, seed=2), [ksd.terms.Reflow()]
    )
    distiller.compile(optimizer=keras.optimizers.SGD(lr))
    return distiller


class ReflowTest(parameterized.TestCase):
    def test_config(self):
        term = ksd.terms.Reflow(
            schedule=ksd.diffusion.CosineSchedule(-15.0, 15.0), weight=0.5
        )
        restored = ksd.terms.Reflow.from_config(term.get_config())
        self.assertEqual(restored.schedule.logsnr_min, -15.0)
        self.assertEqual(restored.weight, 0.5)

    def test_fit_loss_is_the_one_step_samplers_error(self):
        # A zero learning rate: the loss of the first step is the squared
        # error of the student's one-step DDIM sample (unclipped) from
        # each noise, computed in float64 from the official formulas.
        distiller = _distiller()
        noise, images = _pairs()
        history = distiller.fit(
            noise, images, batch_size=8, epochs=1, shuffle=False, verbose=0
        )
        lam = reference.logsnr(1.0)
        x, _ = reference.run_model(distiller.student, np.float64(noise), lam)
        expected = np.mean((x - images) ** 2)
        self.assertAlmostEqual(
            history.history["reflow_loss"][0], expected, delta=1e-5
        )
        one_step = ksd.diffusion.sample(distiller.student, noise, 1, clip=False)
        np.testing.assert_allclose(one_step, x, atol=1e-5)

    def test_refusals(self):
        noise, images = _pairs()
        with self.assertRaisesRegex(ValueError, "without targets"):
            _distiller().fit(noise, epochs=1, verbose=0)
        with self.assertRaisesRegex(ValueError, "an image of its shape"):
            _distiller().fit(noise, images[:, :4], epochs=1, verbose=0)
        with self.assertRaisesRegex(ValueError, "no validation loss"):
            _distiller().evaluate(noise, images, verbose=0)
        compiled = _distiller()
        compiled.compile(optimizer="sgd", loss="mse")
        with self.assertRaisesRegex(ValueError, "without `loss`"):
            compiled.fit(noise, images, epochs=1, verbose=0)
        with self.assertRaisesRegex(TypeError, "CosineSchedule"):
            ksd.terms.Reflow(schedule="cosine")
        with self.assertRaisesRegex(ValueError, "two inputs"):
            ksd.Distiller(
                keras.Sequential(
                    [keras.Input((8, 8, 1)), keras.layers.Dense(1)]
                ),
                [ksd.terms.Reflow()],
            )


# Twenty epochs: in the slow tier, which CI also runs.
@pytest.mark.slow
class ReflowTrainingTest(parameterized.TestCase):
    def test_training_moves_the_sample_towards_its_image(self):
        distiller = _distiller(lr=0.05)
        noise, images = _pairs()
        history = distiller.fit(
            noise, images, batch_size=8, epochs=20, verbose=0
        )
        losses = history.history["reflow_loss"]
        self.assertLess(losses[-1], 0.5 * losses[0])
