import math
import re

import keras
import numpy as np
from absl.testing import parameterized

from keras_selfdistill import schedules


class LinearRampUpTest(parameterized.TestCase):
    def test_config(self):
        schedule = schedules.LinearRampUp(ramp_up_epochs=3, start=0.1, end=0.8)
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(schedule)
        )
        self.assertIsInstance(restored, schedules.LinearRampUp)
        self.assertEqual(restored.get_config(), schedule.get_config())

    def test_step_values(self):
        schedule = schedules.LinearRampUp(ramp_up_steps=4, start=1.0, end=3.0)
        # 1 + 2 · min(step / 4, 1).
        values = [float(schedule(s, 0)) for s in (0, 1, 2, 4, 10)]
        np.testing.assert_allclose(values, [1.0, 1.5, 2.0, 3.0, 3.0])

    def test_epoch_values_ignore_steps(self):
        schedule = schedules.LinearRampUp(ramp_up_epochs=2, end=0.8)
        values = [float(schedule(1000, e)) for e in (0, 1, 2, 5)]
        np.testing.assert_allclose(values, [0.0, 0.4, 0.8, 0.8])

    def test_needs_exactly_one_length(self):
        with self.assertRaisesRegex(ValueError, "exactly one"):
            schedules.LinearRampUp()
        with self.assertRaisesRegex(ValueError, "exactly one"):
            schedules.LinearRampUp(ramp_up_steps=2, ramp_up_epochs=2)

    def test_rejects_bad_lengths(self):
        with self.assertRaisesRegex(ValueError, "ramp_up_steps=0"):
            schedules.LinearRampUp(ramp_up_steps=0)
        with self.assertRaisesRegex(TypeError, "ramp_up_epochs=1.5"):
            schedules.LinearRampUp(ramp_up_epochs=1.5)
        with self.assertRaisesRegex(ValueError, "end=nan"):
            schedules.LinearRampUp(ramp_up_steps=1, end=float("nan"))


class SigmoidRampUpTest(parameterized.TestCase):
    def test_config(self):
        schedule = schedules.SigmoidRampUp(ramp_up_steps=10)
        restored = schedules.SigmoidRampUp.from_config(schedule.get_config())
        self.assertEqual(restored.get_config(), schedule.get_config())

    def test_values(self):
        schedule = schedules.SigmoidRampUp(ramp_up_steps=10, end=2.0)
        # 2 · exp(−5 (1 − p)²) with p = step / 10; exactly 0 at step 0.
        steps = [0, 3, 5, 10, 20]
        expected = [0.0] + [
            2.0 * math.exp(-5 * (1 - min(s / 10, 1)) ** 2) for s in steps[1:]
        ]
        values = [float(schedule(s, 0)) for s in steps]
        np.testing.assert_allclose(values, expected, rtol=1e-6)

    def test_the_curve_from_epoch_zero(self):
        # The mean teacher's sigmoid_rampup: exp(−5) of the way at 0 too.
        schedule = schedules.SigmoidRampUp(
            ramp_up_epochs=5, end=100.0, zero_at_start=False
        )
        expected = [
            100 * math.exp(-5 * (1 - min(e / 5, 1)) ** 2) for e in range(7)
        ]
        values = [float(schedule(0, e)) for e in range(7)]
        np.testing.assert_allclose(values, expected, rtol=1e-6)
        restored = schedules.SigmoidRampUp.from_config(schedule.get_config())
        self.assertFalse(restored.zero_at_start)
        with self.assertRaisesRegex(TypeError, "zero_at_start"):
            schedules.SigmoidRampUp(ramp_up_steps=1, zero_at_start=0)

    def test_value_range(self):
        schedule = schedules.SigmoidRampUp(ramp_up_epochs=3, start=4, end=1)
        self.assertEqual(schedule.value_range(), (1.0, 4.0))


class KerasSchedulesTest(parameterized.TestCase):
    def test_learning_rate_schedule_and_callable_as_hyperparameters(self):
        import keras_selfdistill as ksd

        decay = keras.optimizers.schedules.ExponentialDecay(4.0, 10, 0.5)
        term = ksd.terms.Distillation(
            keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]),
            temperature=decay,
            weight=lambda step: 0.1 * keras.ops.cast(step, "float32"),
        )
        # 4 · 0.5^(step / 10) and 0.1 · step.
        self.assertAlmostEqual(
            float(term.hyperparameter("temperature", 20, 0)), 1.0, places=5
        )
        self.assertAlmostEqual(
            float(term.hyperparameter("weight", 30, 0)), 3.0, places=5
        )
        config = keras.saving.serialize_keras_object(
            ksd.terms.Distillation(term.teacher.model, temperature=decay)
        )
        restored = keras.saving.deserialize_keras_object(config)
        self.assertAlmostEqual(
            float(restored.hyperparameter("temperature", 20, 0)), 1.0, places=5
        )
        with self.assertRaisesRegex(TypeError, "plain function"):
            term.get_config()
        with self.assertRaisesRegex(ValueError, "temperature"):
            ksd.terms.Distillation(term.teacher.model, temperature=lambda s: 0)

    def test_numpy_scalars_are_numbers(self):
        import keras_selfdistill as ksd

        schedule = schedules.LinearRampUp(
            ramp_up_epochs=np.int64(3), end=np.float32(0.5)
        )
        self.assertEqual(schedule.get_config()["ramp_up_epochs"], 3)
        term = ksd.terms.Distillation(
            keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]),
            temperature=np.float32(2.0),
            xi=np.float64(0.5),
        )
        self.assertAlmostEqual(term.temperature, 2.0)
        teacher = ksd.teachers.PastPredictions(np.int64(5), np.int32(2))
        self.assertEqual(teacher.get_config()["num_samples"], 5)
        ksd.teachers.EMA(momentum=np.float32(0.9))
        # np.True_ under NumPy 2, True under 1.26: the value's own repr.
        with self.assertRaisesRegex(
            TypeError, re.escape(f"weight={np.bool_(True)!r}")
        ):
            ksd.terms.Distillation(teacher, weight=np.bool_(True))
        with self.assertRaisesRegex(ValueError, "xi=-0.5"):
            ksd.terms.Distillation(teacher, xi=-0.5)
