import keras
import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny


class RandomInitTest(parameterized.TestCase):
    def test_config(self):
        teacher = ksd.teachers.RandomInit(input_key="image")
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(teacher)
        )
        self.assertEqual(restored.input_key, "image")

    def test_random_copy_stays_fixed(self):
        x, y = tiny.data(n=8)
        student = tiny.mlp(seed=2)
        teacher = ksd.teachers.RandomInit()
        distiller = ksd.Distiller(
            student, [ksd.terms.Distillation(teacher, loss="mse")]
        )
        before = teacher.model.get_weights()
        self.assertFalse(np.allclose(before[0], student.get_weights()[0]))
        distiller.compile(optimizer="adam", loss=tiny.sparse_ce())
        distiller.fit(x, y, batch_size=4, epochs=2, verbose=0)
        for a, b in zip(before, teacher.model.get_weights()):
            np.testing.assert_array_equal(a, b)
