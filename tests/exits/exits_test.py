import os

import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny


class _CountCalls(keras.layers.Layer):
    """Identity that counts how often it runs (in the compiled step too)."""

    def build(self, input_shape):
        self.calls = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="calls"
        )

    def call(self, inputs):
        self.calls.assign_add(1.0)
        return inputs


class DictStudent(keras.Model):
    """A subclassed student returning its logits and block features."""

    def __init__(self):
        super().__init__(name="dict_student")
        self.b1 = keras.layers.Dense(6, activation="relu")
        self.b2 = keras.layers.Dense(5, activation="relu")
        self.head = keras.layers.Dense(tiny.NUM_CLASSES)

    def call(self, x):
        b1 = self.b1(x)
        b2 = self.b2(b1)
        return {"output": self.head(b2), "b1": b1, "b2": b2}


class AttachExitsTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.student = tiny.cnn()
        self.x, self.y = tiny.images()

    @parameterized.named_parameters(
        ("linear", None), ("bottleneck", "bottleneck")
    )
    def test_exits_equal_a_manual_truncation(self, head):
        exits = ksd.exits.attach_exits(self.student, ["b1", "b2"], head=head)
        outputs = exits(self.x)
        self.assertEqual(set(outputs), {"output", "b1", "b2"})
        np.testing.assert_allclose(
            outputs["output"], self.student(self.x), rtol=1e-5, atol=1e-6
        )
        for name in ("b1", "b2"):
            truncated = keras.Model(
                self.student.input, self.student.get_layer(name).output
            )
            manual = exits.heads[name](truncated(self.x))
            np.testing.assert_allclose(
                outputs[name], manual, rtol=1e-5, atol=1e-6
            )
            self.assertEqual(outputs[name].shape, (24, tiny.NUM_CLASSES))

    def test_weights_are_shared_not_copied(self):
        exits = ksd.exits.attach_exits(self.student, ["b1"])
        student_ids = {id(v) for v in self.student.trainable_weights}
        exit_ids = {id(v) for v in exits.trainable_weights}
        self.assertTrue(student_ids < exit_ids)
        self.assertEqual(len(exit_ids), len(exits.trainable_weights))

    def test_head_factory(self):
        shapes = []

        def factory(name, feature_shape, num_classes):
            shapes.append((name, feature_shape, num_classes))
            return keras.Sequential(
                [keras.layers.Flatten(), keras.layers.Dense(num_classes)]
            )

        exits = ksd.exits.attach_exits(self.student, ["b2"], head=factory)
        self.assertEqual(shapes, [("b2", (None, 2, 2, 6), 3)])
        self.assertEqual(exits(self.x)["b2"].shape, (24, 3))

    def test_features(self):
        exits = ksd.exits.attach_exits(self.student, ["b1"], features=True)
        outputs = exits(self.x)
        truncated = keras.Model(
            self.student.input, self.student.get_layer("b1").output
        )
        np.testing.assert_allclose(
            outputs["b1_features"],
            np.mean(truncated(self.x), axis=(1, 2)),
            rtol=1e-5,
            atol=1e-6,
        )
        pooled = keras.Model(
            self.student.input, self.student.get_layer("pool").output
        )
        np.testing.assert_allclose(
            outputs["deepest_features"], pooled(self.x), rtol=1e-5, atol=1e-6
        )

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, r"no layer named \['b9'\]"):
            ksd.exits.attach_exits(self.student, ["b1", "b9"])
        with self.assertRaisesRegex(ValueError, "Valid names: .*'b2'"):
            ksd.exits.attach_exits(self.student, ["nope"])
        with self.assertRaisesRegex(ValueError, "shallowest first"):
            ksd.exits.attach_exits(self.student, ["b2", "b1"])
        with self.assertRaisesRegex(ValueError, "empty"):
            ksd.exits.attach_exits(self.student, [])
        with self.assertRaisesRegex(TypeError, "list of layer names"):
            ksd.exits.attach_exits(self.student, "b1")
        with self.assertRaisesRegex(ValueError, "head="):
            ksd.exits.attach_exits(self.student, ["b1"], head="wide")
        with self.assertRaisesRegex(TypeError, "Keras layer"):
            ksd.exits.attach_exits(
                self.student, ["b1"], head=lambda *args: "not a layer"
            )
        with self.assertRaisesRegex(ValueError, "num_classes"):
            ksd.exits.attach_exits(DictStudent(), ["b1"])
        exits = ksd.exits.attach_exits(self.student, ["b1"])
        with self.assertRaisesRegex(ValueError, r"Valid exits: \['b1'\]"):
            exits.export("b2")

    def test_subclassed_student_returns_named_features(self):
        student = DictStudent()
        exits = ksd.exits.attach_exits(student, ["b1", "b2"], num_classes=3)
        x, _ = tiny.data()
        outputs = exits(x)
        np.testing.assert_allclose(
            outputs["b2"], exits.heads["b2"](student(x)["b2"]), rtol=1e-6
        )
        np.testing.assert_allclose(exits.final(x), student(x)["output"])
        with self.assertRaisesRegex(ValueError, "subclassed"):
            exits.export("b1")
        with self.assertRaisesRegex(ValueError, "subclassed"):
            ksd.exits.EarlyExit(exits)
        bad = ksd.exits.attach_exits(student, ["b3"], num_classes=3)
        with self.assertRaisesRegex(ValueError, r"returned no \['b3'\]"):
            bad(x)


class DistillerWithExitsTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.x, self.y = tiny.images(n=48)

    def _distiller(self, student=None, **kwargs):
        student = student or tiny.cnn()
        distiller = ksd.Distiller(
            student, [ksd.terms.AuxiliaryExits(["b1", "b2"], **kwargs)]
        )
        distiller.compile(
            optimizer="adam", loss=tiny.sparse_ce(), metrics=["accuracy"]
        )
        return distiller

    def test_per_exit_metrics_in_history_and_evaluate(self):
        distiller = self._distiller()
        history = distiller.fit(
            self.x,
            self.y,
            validation_data=(self.x, self.y),
            epochs=2,
            batch_size=16,
            verbose=0,
        )
        for key in (
            "b1_accuracy",
            "b2_accuracy",
            "val_b1_accuracy",
            "val_b2_accuracy",
            "auxiliary_exits_loss",
            "accuracy",
        ):
            self.assertIn(key, history.history)
        self.assertNotIn("val_auxiliary_exits_loss", history.history)
        logs = distiller.evaluate(self.x, self.y, verbose=0, return_dict=True)
        outputs = distiller.exits(self.x)
        for name in ("b1", "b2"):
            manual = np.mean(np.argmax(outputs[name], axis=-1) == self.y)
            self.assertAlmostEqual(logs[f"{name}_accuracy"], manual, places=6)
        predictions = distiller.predict(self.x, verbose=0)
        np.testing.assert_allclose(
            predictions, distiller.student.predict(self.x, verbose=0)
        )

    def test_one_student_forward_per_step(self):
        inputs = keras.Input((6, 6, 1))
        counter = _CountCalls(name="count")
        h = keras.layers.Conv2D(4, 3, activation="relu", name="b1")(
            counter(inputs)
        )
        h = keras.layers.Conv2D(4, 3, activation="relu", name="b2")(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        student = keras.Model(inputs, keras.layers.Dense(3)(h))
        distiller = self._distiller(student)
        # The data checks run the student once on the first batch.
        distiller.check_data = False
        distiller.fit(self.x, self.y, batch_size=16, epochs=1, verbose=0)
        self.assertEqual(float(counter.calls.numpy()), 3.0)

    # Two fresh processes load the files without the library (about 40 s
    # in the TensorFlow pass): the slow tier.
    @pytest.mark.slow
    def test_heads_train_and_the_student_saves_without_heads(self):
        distiller = self._distiller(head="bottleneck")
        before = distiller.exits(self.x)["b1"]
        distiller.fit(self.x, self.y, batch_size=16, epochs=2, verbose=0)
        self.assertFalse(np.allclose(before, distiller.exits(self.x)["b1"]))
        folder = self.create_tempdir().full_path
        student_path = os.path.join(folder, "student.keras")
        distiller.student.save(student_path)
        exit_path = os.path.join(folder, "b1.keras")
        exit_model = distiller.exits.export("b1")
        exit_model.save(exit_path)
        np.testing.assert_allclose(
            exit_model.predict(self.x, verbose=0),
            distiller.exits(self.x)["b1"],
            rtol=1e-5,
            atol=1e-6,
        )
        self.assertEqual(len(distiller.student.layers), len(tiny.cnn().layers))
        if keras.backend.backend() != "tensorflow":
            # The files are the same on every backend; the fresh processes
            # that load them without the library run in the TensorFlow pass.
            return
        for path, model in (
            (student_path, distiller.student),
            (exit_path, exit_model),
        ):
            np.testing.assert_allclose(
                tiny.predict_without_library(path, self.x, folder),
                model.predict(self.x, verbose=0),
                rtol=1e-5,
                atol=1e-6,
            )

    def test_distiller_saves_and_loads_with_its_exits(self):
        distiller = self._distiller(
            weight=[0.3, ksd.schedules.LinearRampUp(ramp_up_steps=5)],
            feature_weight=0.1,
        )
        distiller.fit(self.x, self.y, batch_size=16, epochs=1, verbose=0)
        path = os.path.join(self.create_tempdir().full_path, "d.keras")
        distiller.save(path)
        restored = keras.saving.load_model(path)
        for key, value in distiller.exits(self.x).items():
            np.testing.assert_allclose(
                restored.exits(self.x)[key], value, rtol=1e-5, atol=1e-6
            )
        restored.fit(self.x, self.y, batch_size=16, epochs=1, verbose=0)

    def test_works_beside_a_distillation_term(self):
        student = tiny.cnn()
        teacher = tiny.cnn(seed=5)
        distiller = ksd.Distiller(
            student,
            [
                ksd.terms.Distillation(teacher, temperature=2.0),
                ksd.terms.AuxiliaryExits(["b2"]),
            ],
        )
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.0), loss=tiny.sparse_ce()
        )
        history = distiller.fit(
            self.x, self.y, batch_size=48, epochs=1, verbose=0
        )
        # The Distillation term sees the student's output, not the exits.
        expected = tiny.kd(
            teacher.predict(self.x, verbose=0),
            student.predict(self.x, verbose=0),
            2.0,
        ).mean()
        self.assertAlmostEqual(
            history.history["distillation_loss"][0], expected, places=5
        )

    def test_two_exit_terms_are_refused(self):
        with self.assertRaisesRegex(ValueError, "as `distiller.exits`"):
            ksd.Distiller(
                tiny.cnn(),
                [
                    ksd.terms.AuxiliaryExits(["b1"]),
                    ksd.terms.AuxiliaryExits(["b2"], name="more"),
                ],
            )

    def test_subclassed_student_trains_with_exits(self):
        student = DictStudent()
        x, y = tiny.data(n=32)
        student(x)
        exits = ksd.exits.attach_exits(student, ["b1", "b2"], num_classes=3)
        distiller = ksd.Distiller(student, [ksd.terms.AuxiliaryExits(exits)])
        distiller.compile(optimizer="adam", loss=tiny.sparse_ce())
        history = distiller.fit(x, y, epochs=2, batch_size=8, verbose=0)
        self.assertIn("b2_accuracy", history.history)
        self.assertEqual(distiller.predict(x, verbose=0).shape, (32, 3))
