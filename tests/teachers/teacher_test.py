"""The public contract of `Teacher`: a custom teacher with state."""

import os

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops

import keras_selfdistill as ksd
from tests import tiny


@keras.saving.register_keras_serializable(package="tests")
class CountingTeacher(ksd.teachers.Teacher):
    """A frozen model's logits, and a count of the steps it has followed
    (state that checkpoints carry, updated after each optimizer step)."""

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        model.trainable = False
        self.model = model
        self.steps = self.add_weight(
            shape=(), initializer="zeros", dtype="int32", trainable=False
        )

    def targets(self, x, y_pred, temperature):
        inputs = ksd.batch.select_input(x, self.input_key, self.name)
        return ops.stop_gradient(self.model(inputs, training=False))

    def update(self, data):
        self.steps.assign_add(1)

    def get_config(self):
        config = super().get_config()
        config["model"] = keras.saving.serialize_keras_object(self.model)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)


class CustomTeacherTest(parameterized.TestCase):
    def test_trains_saves_and_loads(self):
        x, y = tiny.data()
        model = tiny.mlp(hidden=16, seed=1)
        teacher = CountingTeacher(model)
        distiller = ksd.Distiller(
            tiny.mlp(), [ksd.terms.Distillation(teacher, temperature=2.0)]
        )
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.0), loss=tiny.sparse_ce()
        )
        history = distiller.fit(x, y, batch_size=8, epochs=2, verbose=0)
        self.assertEqual(int(ops.convert_to_numpy(teacher.steps)), 6)
        # The KD loss against the model's logits, at unchanged weights.
        expected = tiny.kd(
            model.predict(x, verbose=0),
            distiller.student.predict(x, verbose=0),
            2.0,
        ).mean()
        np.testing.assert_allclose(
            history.history["distillation_loss"][-1], expected, rtol=1e-4
        )
        path = os.path.join(self.create_tempdir().full_path, "d.keras")
        distiller.save(path)
        restored = keras.saving.load_model(path)
        loaded = restored.terms[0].teacher
        self.assertIsInstance(loaded, CountingTeacher)
        self.assertEqual(int(ops.convert_to_numpy(loaded.steps)), 6)
        np.testing.assert_allclose(
            loaded.model.predict(x, verbose=0), model.predict(x, verbose=0)
        )
        restored.fit(x, y, batch_size=8, epochs=1, verbose=0)
        self.assertEqual(int(ops.convert_to_numpy(loaded.steps)), 9)
