import keras
import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny
from tests.terms.on_policy_test import _windows


class SequenceKDTest(parameterized.TestCase):
    def setUp(self):
        self.teacher = tiny.language_model(seed=1)

    def test_config(self):
        term = ksd.terms.SequenceKD(self.teacher, 3, fraction=0.5, seed=2)
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(term)
        )
        self.assertIsInstance(restored, ksd.terms.SequenceKD)
        self.assertIsInstance(restored.teacher, ksd.teachers.FrozenModel)
        self.assertEqual((restored.prompt_length, restored.fraction), (3, 0.5))
        self.assertEqual(restored.temperature, 0.0)

    def test_labels_are_the_teachers_greedy_continuation(self):
        distiller = ksd.Distiller(
            tiny.language_model(seed=2),
            [ksd.terms.SequenceKD(self.teacher, prompt_length=2)],
        )
        x, y = _windows(n=4)
        new_x, new_y, weights = [
            keras.ops.convert_to_numpy(t)
            for t in distiller.terms[0].rewrite_batch(x, y, None)
        ]
        sequence = np.concatenate([x, y[:, -1:]], axis=1)
        for i in range(2, 7):
            logits = self.teacher.predict(sequence[:, :6], verbose=0)
            sequence[:, i] = logits[:, i - 1].argmax(-1)
        np.testing.assert_array_equal(new_x, sequence[:, :6])
        np.testing.assert_array_equal(new_y, sequence[:, 1:])
        np.testing.assert_array_equal(weights, [[0, 1, 1, 1, 1, 1]] * 4)

    def test_trains_with_the_compiled_loss(self):
        # Every step on the teacher's sequences: the dataset's tokens after
        # the prompt are never read.
        x, y = _windows()
        other_x, other_y = x.copy(), y.copy()
        other_x[:, 2:] = (x[:, 2:] + 5) % 11
        other_y[:, 1:] = (y[:, 1:] + 3) % 11
        weights = []
        for data in ((x, y), (other_x, other_y)):
            distiller = ksd.Distiller(
                tiny.language_model(seed=2),
                [ksd.terms.SequenceKD(self.teacher, prompt_length=2)],
            )
            distiller.compile(optimizer="adam", loss=tiny.sparse_ce())
            history = distiller.fit(*data, batch_size=4, epochs=2, verbose=0)
            self.assertLess(history.history["loss"][-1], 2.4)
            # The whole loss is the supervised part, and is logged so.
            np.testing.assert_allclose(
                history.history["supervised_loss"],
                history.history["loss"],
                rtol=1e-5,
            )
            weights.append(distiller.student.get_weights())
        for a, b in zip(*weights):
            np.testing.assert_array_equal(a, b)

    def test_refuses_a_bank_teacher(self):
        with self.assertRaisesRegex(ValueError, "function of the inputs"):
            ksd.terms.SequenceKD(
                ksd.teachers.PastPredictions(16, 11), prompt_length=2
            )
