import keras
import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny


def _teacher_with_batch_norm():
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(tiny.NUM_CLASSES),
        ],
        name="teacher",
    )


class FrozenModelTest(parameterized.TestCase):
    def test_config(self):
        teacher = ksd.teachers.FrozenModel(tiny.mlp(), input_key="teacher")
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(teacher)
        )
        self.assertIsInstance(restored, ksd.teachers.FrozenModel)
        self.assertEqual(restored.input_key, "teacher")
        self.assertEqual(len(restored.model.layers), 2)

    def test_weights_and_batch_norm_statistics_unchanged_by_fit(self):
        x, y = tiny.data(n=32)
        model = _teacher_with_batch_norm()
        model.trainable = True
        before = [np.copy(v.numpy()) for v in model.variables]
        distiller = ksd.Distiller(
            tiny.mlp(name="student"),
            [ksd.terms.Distillation(model, temperature=2.0)],
        )
        distiller.compile(optimizer="adam", loss=tiny.sparse_ce())
        distiller.fit(x, y, batch_size=8, epochs=3, verbose=0)
        self.assertFalse(model.trainable)
        for old, variable in zip(before, model.variables):
            np.testing.assert_array_equal(old, variable.numpy(), variable.path)

    def test_targets_are_inference_mode_logits(self):
        x, _ = tiny.data(n=6)
        model = _teacher_with_batch_norm()
        teacher = ksd.teachers.FrozenModel(model)
        np.testing.assert_array_equal(
            teacher.targets(x, None, 1.0), model(x, training=False)
        )

    def test_rejects_non_model(self):
        with self.assertRaisesRegex(TypeError, "must be a `keras.Model`"):
            ksd.teachers.FrozenModel(keras.layers.Dense(3))

    def test_rejects_student_itself_and_shared_weights(self):
        student = tiny.mlp()
        with self.assertRaisesRegex(ValueError, "student model itself"):
            ksd.teachers.FrozenModel(student).attach(student)
        wrapper = keras.Sequential([student])
        with self.assertRaisesRegex(ValueError, "shares variables"):
            ksd.teachers.FrozenModel(wrapper).attach(student)

    def test_rejects_missing_input_key(self):
        teacher = ksd.teachers.FrozenModel(tiny.mlp(), input_key="teacher")
        with self.assertRaisesRegex(ValueError, "'teacher'.*\\['image'\\]"):
            teacher.targets({"image": np.zeros((1, 4))}, None, 1.0)
        with self.assertRaisesRegex(TypeError, "input_key=3"):
            ksd.teachers.FrozenModel(tiny.mlp(), input_key=3)
