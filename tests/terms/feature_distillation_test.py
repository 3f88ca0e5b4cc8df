import os

import keras
import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny


def _distiller(term, student=None):
    distiller = ksd.Distiller(student or tiny.cnn(), [term])
    distiller.compile(keras.optimizers.SGD(0.0), tiny.sparse_ce())
    return distiller


def _features(model, layer, x):
    tapped = keras.Model(model.input, model.get_layer(layer).output)
    return np.float64(keras.ops.convert_to_numpy(tapped(x, training=False)))


class _CountCalls(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="calls"
        )

    def call(self, inputs):
        self.calls.assign_add(1.0)
        return inputs


class FeatureDistillationTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.x, self.y = tiny.images(n=8)

    def test_config(self):
        term = ksd.terms.FeatureDistillation(
            tiny.cnn(seed=3),
            "b1",
            teacher_layer="b2",
            projector="orthogonal",
            loss="cosine",
            normalize="layer",
            weight=0.5,
            name="hint",
        )
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(term)
        )
        self.assertEqual(
            (restored.student_layer, restored.teacher_layer, restored.name),
            ("b1", "b2", "hint"),
        )
        self.assertEqual(
            (restored.projector, restored.loss, restored.normalize),
            ("orthogonal", "cosine", "layer"),
        )
        self.assertAlmostEqual(restored.weight, 0.5)

    @parameterized.named_parameters(
        ("mse", "mse", None),
        ("l1_layer", "l1", "layer"),
        ("cosine_batch", "cosine", "batch"),
    )
    def test_loss_matches_numpy(self, loss, normalize):
        teacher = tiny.cnn(seed=3)
        term = ksd.terms.FeatureDistillation(
            teacher, "b2", loss=loss, normalize=normalize
        )
        distiller = _distiller(term)
        outputs = distiller(self.x, training=True)
        got = term.compute_loss(self.x, self.y, outputs, None, 0, 0)
        # The student's b2 map through the Dense projector (x·W + b), the
        # teacher's b2 map, normalised, compared per sample in float64.
        kernel, bias = (np.float64(w) for w in term.projection.get_weights())
        student = _features(distiller.student, "b2", self.x) @ kernel + bias
        target = _features(teacher, "b2", self.x)
        if normalize == "layer":
            axes = (-1,)
        elif normalize == "batch":
            axes = (0, 1, 2)
        if normalize is not None:
            target = (target - target.mean(axes, keepdims=True)) / np.sqrt(
                target.var(axes, keepdims=True) + 1e-5
            )
        if loss == "mse":
            per_sample = ((student - target) ** 2).mean((1, 2, 3))
        elif loss == "l1":
            per_sample = np.abs(student - target).mean((1, 2, 3))
        else:
            # A ReLU map's zero vector has no direction: cosine 0.
            norms = np.linalg.norm(student, axis=-1) * np.linalg.norm(
                target, axis=-1
            )
            cosine = (student * target).sum(-1) / np.maximum(norms, 1e-8)
            per_sample = (1 - cosine).mean((1, 2))
        self.assertAlmostEqual(float(got), per_sample.mean(), places=5)

    def test_shapes_are_pooled_resized_or_refused(self):
        teacher = tiny.cnn(seed=3)
        outputs = {}
        for student_layer, teacher_layer in (
            ("b1", "b2"),  # 6×6 pooled by 3 to 2×2
            ("b2", "b1"),  # 2×2 resized to 6×6
            ("b1", "pool"),  # a map averaged to a vector
        ):
            term = ksd.terms.FeatureDistillation(
                teacher, student_layer, teacher_layer
            )
            distiller = _distiller(term)
            features = term._align(distiller(self.x, training=True)[term._key])
            target = _features(teacher, teacher_layer, self.x)
            self.assertEqual(features.shape, target.shape)
            outputs[(student_layer, teacher_layer)] = features
        projected = keras.ops.convert_to_numpy(
            term.projection(
                _features(distiller.student, "b1", self.x).astype("f4")
            )
        )
        np.testing.assert_allclose(
            outputs[("b1", "pool")], projected.mean((1, 2)), rtol=1e-5
        )
        with self.assertRaisesRegex(ValueError, "cannot be matched"):
            _distiller(ksd.terms.FeatureDistillation(teacher, "pool", "b1"))
        with self.assertRaisesRegex(ValueError, "4 channels.*6"):
            _distiller(
                ksd.terms.FeatureDistillation(
                    teacher, "b1", "b2", projector=None
                )
            )

    @parameterized.named_parameters(("down", "b3", "b2"), ("up", "b2", "b3"))
    def test_orthogonal_projector_is_orthonormal(self, student, teacher):
        term = ksd.terms.FeatureDistillation(
            tiny.cnn(seed=3), student, teacher, projector="orthogonal"
        )
        _distiller(term)
        kernel = keras.ops.convert_to_numpy(term.projection.kernel())
        small = min(kernel.shape)
        gram = (
            kernel.T @ kernel if kernel.shape[0] > small else kernel @ kernel.T
        )
        np.testing.assert_allclose(gram, np.eye(small), atol=1e-5)

    @tiny.ONCE
    def test_one_student_forward_and_the_projector_stays_out(self):
        inputs = keras.Input((6, 6, 1))
        counter = _CountCalls(name="count")
        h = keras.layers.Conv2D(4, 3, activation="relu", name="b1")(
            counter(inputs)
        )
        h = keras.layers.GlobalAveragePooling2D()(h)
        student = keras.Model(inputs, keras.layers.Dense(3)(h))
        teacher = tiny.cnn(seed=3)
        term = ksd.terms.FeatureDistillation(teacher, "b1", "b3")
        distiller = ksd.Distiller(student, [term], check_data=False)
        distiller.compile("adam", tiny.sparse_ce())
        before = [w.copy() for w in term.projection.get_weights()]
        distiller.fit(self.x, self.y, batch_size=4, epochs=1, verbose=0)
        self.assertEqual(float(counter.calls.numpy()), 2.0)
        self.assertFalse(
            np.allclose(
                before[0], keras.ops.convert_to_numpy(term.projection.kernel)
            )
        )
        self.assertLen(distiller.student.layers, 5)
        self.assertEqual(
            [v.name for v in distiller.student.trainable_variables],
            [v.name for v in student.trainable_variables],
        )

    def test_self_teachers_and_a_snapshot_before_its_first(self):
        losses = {}
        for teacher in (
            ksd.teachers.EMA(momentum=0.9),
            ksd.teachers.Snapshot(freq=1),
            ksd.teachers.RandomInit(),
        ):
            term = ksd.terms.FeatureDistillation(teacher, "b2")
            distiller = ksd.Distiller(tiny.cnn(), [term])
            distiller.compile("adam", tiny.sparse_ce())
            history = distiller.fit(
                self.x, self.y, batch_size=4, epochs=2, verbose=0
            )
            losses[type(teacher).__name__] = history.history[
                "feature_distillation_loss"
            ]
        self.assertEqual(losses["Snapshot"][0], 0.0)
        self.assertGreater(losses["Snapshot"][1], 0.0)
        self.assertGreater(losses["EMA"][0], 0.0)
        self.assertGreater(losses["RandomInit"][0], 0.0)

    def test_subclassed_student_returning_a_dict(self):
        class DictStudent(keras.Model):
            def __init__(self):
                super().__init__()
                self.conv = keras.layers.Conv2D(5, 3, strides=2, name="c")
                self.pool = keras.layers.GlobalAveragePooling2D()
                self.head = keras.layers.Dense(3)

            def call(self, x):
                features = self.conv(x)
                return {
                    "output": self.head(self.pool(features)),
                    "conv": features,
                }

        student = DictStudent()
        student(self.x[:1])
        term = ksd.terms.FeatureDistillation(tiny.cnn(seed=3), "conv", "b2")
        distiller = ksd.Distiller(student, [term])
        distiller.compile("adam", tiny.sparse_ce(), metrics=["accuracy"])
        history = distiller.fit(self.x, self.y, batch_size=4, verbose=0)
        self.assertGreater(history.history["feature_distillation_loss"][0], 0)
        self.assertEqual(distiller.predict(self.x, verbose=0).shape, (8, 3))

    def test_conv1x1_is_mdistillers_conv_reg_with_pytorch_constants(self):
        # FitNets' regressor: 1x1 convolution, BatchNorm2d (eps 1e-5,
        # momentum 0.1: Keras's 0.9), ReLU, in training mode.
        term = ksd.terms.FeatureDistillation(
            tiny.cnn(seed=3), "b2", projector="conv1x1"
        )
        term.attach(tiny.cnn())
        rng = np.random.default_rng(0)
        features = rng.normal(size=(5, 2, 2, 6)).astype("float32")
        got = keras.ops.convert_to_numpy(
            term.projection(features, training=True)
        )
        convolution, normalization, _ = term.projection.layers
        kernel = keras.ops.convert_to_numpy(convolution.kernel)[0, 0]
        h = np.float64(features) @ kernel
        mean, variance = h.mean((0, 1, 2)), h.var((0, 1, 2))
        expected = np.maximum((h - mean) / np.sqrt(variance + 1e-5), 0.0)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(normalization.moving_mean),
            0.1 * mean,
            rtol=1e-4,
            atol=1e-6,
        )

    @tiny.ONCE
    def test_saves_and_loads_with_its_projector(self):
        term = ksd.terms.FeatureDistillation(
            tiny.cnn(seed=3), "b2", projector="conv1x1"
        )
        distiller = ksd.Distiller(tiny.cnn(), [term])
        distiller.compile("adam", tiny.sparse_ce())
        distiller.fit(self.x, self.y, batch_size=4, verbose=0)
        path = os.path.join(self.create_tempdir().full_path, "d.keras")
        distiller.save(path)
        restored = keras.saving.load_model(path)
        features = distiller(self.x, training=True)[term._key]
        np.testing.assert_allclose(
            restored(self.x, training=True)[term._key], features, atol=1e-5
        )

    @tiny.ONCE
    def test_bad_arguments_are_refused(self):
        teacher = tiny.cnn(seed=3)
        bank = ksd.teachers.PastPredictions(8, 3)
        with self.assertRaisesRegex(TypeError, "holds no model"):
            _distiller(ksd.terms.FeatureDistillation(bank, "b2"))
        with self.assertRaisesRegex(ValueError, "no layer named 'b9'"):
            _distiller(ksd.terms.FeatureDistillation(teacher, "b9"))
        with self.assertRaisesRegex(ValueError, "projector='wide'"):
            ksd.terms.FeatureDistillation(teacher, "b2", projector="wide")
        with self.assertRaisesRegex(ValueError, "loss='kl'"):
            ksd.terms.FeatureDistillation(teacher, "b2", loss="kl")
        with self.assertRaisesRegex(ValueError, "normalize='whiten'"):
            ksd.terms.FeatureDistillation(teacher, "b2", normalize="whiten")
        with self.assertRaisesRegex(TypeError, "student_layer=3"):
            ksd.terms.FeatureDistillation(teacher, 3)

    def test_the_projector_regularizer_is_minimised(self):
        def projector(student_shape, teacher_shape):
            return keras.layers.Dense(
                teacher_shape[-1],
                kernel_regularizer=keras.regularizers.L2(10.0),
            )

        term = ksd.terms.FeatureDistillation(
            tiny.cnn(seed=3), "b2", projector=projector
        )
        distiller = _distiller(term)
        logs = distiller.fit(self.x, self.y, batch_size=8, verbose=0).history
        kernel = keras.ops.convert_to_numpy(term.projection.kernel)
        penalty = 10.0 * np.sum(np.square(kernel))
        self.assertAlmostEqual(
            logs["loss"][0]
            - logs["supervised_loss"][0]
            - logs["feature_distillation_loss"][0],
            penalty,
            places=3,
        )

    def test_a_softmax_teacher_with_other_classes_gives_features(self):
        inputs = keras.Input((6, 6, 1))
        h = keras.layers.Conv2D(5, 3, name="stage")(inputs)
        h = keras.layers.GlobalAveragePooling2D()(h)
        backbone = keras.Model(
            inputs, keras.layers.Dense(7, activation="softmax")(h)
        )
        term = ksd.terms.FeatureDistillation(backbone, "b1", "stage")
        distiller = _distiller(term)
        history = distiller.fit(self.x, self.y, batch_size=8, verbose=0)
        self.assertGreater(history.history["feature_distillation_loss"][0], 0)
        with self.assertRaisesRegex(ValueError, "ends in a softmax"):
            ksd.terms.Distillation(backbone)
        with self.assertRaisesRegex(ValueError, "not targets"):
            term.teacher.targets(self.x, None, 1.0)
