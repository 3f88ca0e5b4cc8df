import os

import keras
import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny


def _student_with_batch_norm(seed=2):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(tiny.NUM_CLASSES),
        ]
    )


class _RecordWeights(keras.callbacks.Callback):
    def __init__(self, model):
        super().__init__()
        self.student = model
        self.history = []

    def on_train_batch_end(self, batch, logs=None):
        # Reading `self.model` syncs JAX's training state into the variables.
        _ = self.model
        self.history.append([v.numpy().copy() for v in self.student.variables])


class EMATest(parameterized.TestCase):
    def test_config(self):
        teacher = ksd.teachers.EMA(momentum=0.9, input_key="student")
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(teacher)
        )
        self.assertEqual(restored.momentum, 0.9)
        self.assertEqual(restored.input_key, "student")

    @parameterized.named_parameters(
        ("one_step_per_execution", 1), ("three_steps_per_execution", 3)
    )
    def test_weights_follow_numpy_ema(self, steps_per_execution):
        x, y = tiny.data(n=24)
        student = _student_with_batch_norm()
        initial = [v.numpy().copy() for v in student.variables]
        teacher = ksd.teachers.EMA(momentum=0.8)
        distiller = ksd.Distiller(
            student, [ksd.terms.Distillation(teacher, weight=0.5)]
        )
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=tiny.sparse_ce(),
            steps_per_execution=steps_per_execution,
        )
        recorder = _RecordWeights(student)
        distiller.fit(
            x,
            y,
            batch_size=4,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[recorder],
        )
        self.assertEqual(int(teacher.updates.numpy()), 6)
        final_student = [v.numpy() for v in student.variables]
        # Every variable, moving statistics included:
        # ema_t = 0.8 · ema_{t−1} + 0.2 · w_t, starting from w_0.
        expected = initial
        if steps_per_execution == 1:
            for weights in recorder.history:
                expected = [
                    0.8 * e + 0.2 * w for e, w in zip(expected, weights)
                ]
            for e, v in zip(expected, teacher.model.variables):
                np.testing.assert_allclose(v.numpy(), e, rtol=1e-5, atol=1e-6)
        else:
            self.assertLen(recorder.history, 2)
        moving_mean = teacher.model.layers[1].moving_mean.numpy()
        self.assertFalse(np.allclose(moving_mean, 0.0))
        self.assertFalse(
            np.allclose(teacher.model.variables[0].numpy(), final_student[0])
        )

    def test_same_updates_with_steps_per_execution(self):
        x, y = tiny.data(n=24)
        results = []
        for steps in (1, 3):
            student = _student_with_batch_norm()
            teacher = ksd.teachers.EMA(momentum=0.8)
            distiller = ksd.Distiller(
                student, [ksd.terms.Distillation(teacher, weight=0.5)]
            )
            distiller.compile(
                optimizer=keras.optimizers.SGD(0.1),
                loss=tiny.sparse_ce(),
                steps_per_execution=steps,
            )
            distiller.fit(x, y, batch_size=4, shuffle=False, verbose=0)
            results.append([v.numpy() for v in teacher.model.variables])
        for a, b in zip(*results):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    def test_starts_from_weights_loaded_after_construction(self):
        x, y = tiny.data(n=8)
        student = tiny.mlp(seed=2)
        teacher = ksd.teachers.EMA(momentum=0.5)
        distiller = ksd.Distiller(student, [ksd.terms.Distillation(teacher)])
        pretrained = tiny.mlp(seed=7).get_weights()
        student.set_weights(pretrained)
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.0), loss=tiny.sparse_ce()
        )
        distiller.fit(x, y, batch_size=8, verbose=0)
        for a, b in zip(teacher.model.get_weights(), pretrained):
            np.testing.assert_allclose(a, b, rtol=1e-6)

    def test_saved_with_distiller(self):
        x, y = tiny.data(n=8)
        teacher = ksd.teachers.EMA(momentum=0.5)
        distiller = ksd.Distiller(
            tiny.mlp(seed=2), [ksd.terms.Distillation(teacher)]
        )
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        distiller.fit(x, y, batch_size=4, verbose=0)
        path = os.path.join(self.create_tempdir().full_path, "d.keras")
        distiller.save(path)
        restored = keras.saving.load_model(path)
        for a, b in zip(
            restored.terms[0].teacher.model.get_weights(),
            teacher.model.get_weights(),
        ):
            np.testing.assert_array_equal(a, b)
        self.assertEqual(int(restored.terms[0].teacher.updates.numpy()), 2)

    def test_warmup_is_the_true_average_until_the_decay(self):
        # The mean teacher's min(1 − 1/(t + 1), decay) at the t-th update:
        # the mean of the weights seen while t/(t + 1) < decay.
        student = tiny.mlp()
        teacher = ksd.teachers.EMA(momentum=0.8, warmup=True)
        teacher.attach(student)
        teacher.on_train_begin()
        rng = np.random.default_rng(0)
        seen = [[v.numpy().copy() for v in student.variables]]
        for step in range(6):
            student.set_weights(
                [rng.normal(size=w.shape).astype("float32") for w in seen[0]]
            )
            seen.append(student.get_weights())
            teacher.update(None)
            if step < 3:  # updates 1, 2, 3: momenta 1/2, 2/3, 3/4
                expected = [np.mean(ws, axis=0) for ws in zip(*seen)]
            else:  # then 0.8
                expected = [
                    0.8 * e + 0.2 * w for e, w in zip(expected, seen[-1])
                ]
            for got, want in zip(teacher.model.get_weights(), expected):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(teacher)
        )
        self.assertTrue(restored.warmup)
        with self.assertRaisesRegex(TypeError, "warmup=1"):
            ksd.teachers.EMA(warmup=1)

    def test_rejects_bad_momentum_and_reuse(self):
        with self.assertRaisesRegex(ValueError, "momentum=1.0"):
            ksd.teachers.EMA(momentum=1.0)
        teacher = ksd.teachers.EMA()
        ksd.Distiller(tiny.mlp(), [ksd.terms.Distillation(teacher)])
        with self.assertRaisesRegex(ValueError, "already follows a student"):
            ksd.Distiller(tiny.mlp(), [ksd.terms.Distillation(teacher)])
