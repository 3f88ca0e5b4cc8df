"""The public contract of `Term`: a custom term in about 30 lines."""

import os

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops

import keras_selfdistill as ksd
from tests import tiny


@keras.saving.register_keras_serializable(package="tests")
class ViewAgreement(ksd.terms.Term):
    """A Dense of its own projects the pooled features of the layer `b2` on
    the batch and on its left-right mirror; the loss is `scale` times the
    mean squared difference of the two projections."""

    reads_forward = True
    taps = ("b2",)

    def __init__(self, units=4, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.add_hyperparameter("scale", scale, minimum=0.0)
        self.projection = keras.layers.Dense(units, name="projection")

    def attach(self, student):
        # Built here, before any step, so that a loaded distiller's copy
        # has the variables its file holds.
        channels = student.get_layer("b2").output.shape[-1]
        self.projection.build((None, channels))

    def view(self, inputs, training=None):
        return ops.flip(inputs, axis=2)

    def forward(self, outputs, training=None):
        def project(taps):
            return self.projection(ops.mean(taps["b2"], axis=(1, 2)))

        return {"agreement": (project(outputs), project(outputs["view"]))}

    def compute_loss(self, x, y, y_pred, sample_weight, step, epoch):
        batch, mirror = y_pred["agreement"]
        scale = self.hyperparameter("scale", step, epoch)
        values = scale * ops.mean(ops.square(batch - mirror), axis=-1)
        return self.reduce(values, sample_weight)

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units, scale=self.hyperparameter_config("scale")
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["scale"] = ksd.schedules.deserialize(config["scale"])
        return super().from_config(config)


def _agreement(student, projection, x, scale):
    """The loss in NumPy, from the student's layer `b2` and the Dense."""
    features = keras.Model(student.input, student.get_layer("b2").output)
    kernel, bias = (np.float64(w) for w in projection.get_weights())

    def project(images):
        pooled = np.float64(features.predict(images, verbose=0)).mean((1, 2))
        return pooled @ kernel + bias

    difference = project(x) - project(x[:, :, ::-1])
    return scale * np.mean(np.mean(difference**2, axis=-1))


class CustomTermTest(parameterized.TestCase):
    def test_trains_saves_and_loads(self):
        x, y = tiny.images()
        scale = ksd.schedules.LinearRampUp(ramp_up_steps=2, end=0.5)
        term = ViewAgreement(units=3, scale=scale, weight=2.0)
        distiller = ksd.Distiller(tiny.cnn(), [term])
        # A zero learning rate: the logged loss is the loss at the
        # weights measured here, and the scale's ramp at step 0 is 0.
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.0), loss=tiny.sparse_ce()
        )
        distiller.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
        history = distiller.fit(x, y, batch_size=len(x), epochs=2, verbose=0)
        logged = history.history["view_agreement_loss"]
        expected = _agreement(distiller.student, term.projection, x, 0.5)
        np.testing.assert_allclose(logged[-1], expected, rtol=1e-4)
        self.assertEqual(history.history["view_agreement_scale"][-1], 0.5)
        # Its own layer trains with the student.
        distiller.compile(optimizer="adam", loss=tiny.sparse_ce())
        before = term.projection.get_weights()[0].copy()
        distiller.fit(x, y, batch_size=8, epochs=1, verbose=0)
        self.assertGreater(
            np.abs(term.projection.get_weights()[0] - before).max(), 0
        )
        path = os.path.join(self.create_tempdir().full_path, "d.keras")
        distiller.save(path)
        restored = keras.saving.load_model(path)
        loaded = restored.terms[0]
        self.assertIsInstance(loaded, ViewAgreement)
        self.assertEqual(loaded.units, 3)
        self.assertEqual(
            loaded.hyperparameter_config("scale"),
            term.hyperparameter_config("scale"),
        )
        self.assertEqual(
            loaded.hyperparameter_config("scale")["class_name"],
            "LinearRampUp",
        )
        self.assertEqual(loaded.weight, 2.0)
        for a, b in zip(
            loaded.projection.get_weights(), term.projection.get_weights()
        ):
            np.testing.assert_array_equal(a, b)
        restored.fit(x, y, batch_size=8, epochs=1, verbose=0)

    def test_taps_without_reads_forward_are_refused(self):
        class Undeclared(ViewAgreement):
            reads_forward = False

        with self.assertRaisesRegex(ValueError, "reads_forward = True"):
            ksd.Distiller(tiny.cnn(), [Undeclared()])

    def test_the_private_names_warn_and_still_work(self):
        term = ksd.terms.Distillation(tiny.mlp())
        values = ops.convert_to_tensor([1.0, 3.0])
        with self.assertWarnsRegex(DeprecationWarning, "Term.reduce"):
            value = term._reduce(values, None)
        self.assertAlmostEqual(float(value), 2.0, places=6)
        with self.assertWarnsRegex(DeprecationWarning, "add_hyperparameter"):
            term._add_hyperparameter("gamma", 0.5)
        self.assertEqual(term._get_hyperparameter("gamma"), 0.5)
