import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny


def _fit_without_learning(distiller, x, y=None, **kwargs):
    # SGD with learning rate 0 keeps every weight fixed, so each batch's loss
    # can be recomputed in numpy from the initial models.
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=tiny.sparse_ce() if y is not None else None,
    )
    return distiller.fit(x, y, shuffle=False, verbose=0, **kwargs)


class DistillerTest(parameterized.TestCase):
    def setUp(self):
        self.x, self.y = tiny.data(n=10)
        self.teacher = tiny.mlp(hidden=16, name="teacher", seed=1)
        self.student = tiny.mlp(name="student", seed=2)

    def _kd(self, temperature=2.0):
        return tiny.kd(
            self.teacher.predict(self.x, verbose=0),
            self.student.predict(self.x, verbose=0),
            temperature,
        )

    def _kd_at(self, temperature):
        return self._kd(temperature).mean()

    def _ce(self):
        probs = tiny.softmax(
            np.float64(self.student.predict(self.x, verbose=0))
        )
        return -np.log(probs[np.arange(len(self.y)), self.y])

    def test_config(self):
        distiller = ksd.Distiller(
            self.student,
            [ksd.terms.Distillation(self.teacher, temperature=3.0)],
            input_key=None,
            name="kd",
        )
        restored = ksd.Distiller.from_config(distiller.get_config())
        self.assertEqual(restored.name, "kd")
        self.assertEqual(len(restored.terms), 1)
        self.assertEqual(restored.terms[0].temperature, 3.0)

    def test_epoch_metric_is_mean_over_samples_not_last_batch(self):
        distiller = ksd.Distiller(
            self.student,
            [ksd.terms.Distillation(self.teacher, temperature=2.0)],
        )
        history = _fit_without_learning(distiller, self.x, self.y, batch_size=4)
        # Batches of 4, 4 and 2: the epoch value is the per-sample mean.
        kd = self._kd()
        self.assertAlmostEqual(
            history.history["distillation_loss"][0], kd.mean(), places=5
        )
        self.assertNotAlmostEqual(kd[8:].mean(), kd.mean(), places=3)
        self.assertAlmostEqual(
            history.history["loss"][0], self._ce().mean() + kd.mean(), places=5
        )

    def test_sample_and_class_weights_weight_terms(self):
        distiller = ksd.Distiller(
            self.student,
            [ksd.terms.Distillation(self.teacher, temperature=2.0)],
        )
        class_weight = {0: 0.0, 1: 1.0, 2: 3.0}
        history = _fit_without_learning(
            distiller, self.x, self.y, batch_size=10, class_weight=class_weight
        )
        weights = np.array([class_weight[c] for c in self.y])
        self.assertAlmostEqual(
            history.history["distillation_loss"][0],
            np.sum(weights * self._kd()) / 10,
            places=5,
        )
        history = _fit_without_learning(
            distiller, self.x, self.y, batch_size=10, sample_weight=weights
        )
        self.assertAlmostEqual(
            history.history["distillation_loss"][0],
            np.sum(weights * self._kd()) / 10,
            places=5,
        )

    def test_xi_zero_reproduces_plain_training(self):
        plain = tiny.mlp(name="plain", seed=2)
        plain.compile(
            optimizer=keras.optimizers.SGD(0.1), loss=tiny.sparse_ce()
        )
        plain.fit(
            self.x, self.y, batch_size=4, epochs=3, shuffle=False, verbose=0
        )
        distiller = ksd.Distiller(
            self.student,
            [ksd.terms.Distillation(self.teacher, temperature=4.0, xi=0.0)],
        )
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.1), loss=tiny.sparse_ce()
        )
        distiller.fit(
            self.x, self.y, batch_size=4, epochs=3, shuffle=False, verbose=0
        )
        for a, b in zip(plain.get_weights(), self.student.get_weights()):
            np.testing.assert_allclose(a, b, atol=1e-6)

    def test_xi_mixes_labels_and_teacher(self):
        distiller = ksd.Distiller(
            self.student,
            [ksd.terms.Distillation(self.teacher, temperature=2.0, xi=1.5)],
        )
        history = _fit_without_learning(
            distiller, self.x, self.y, batch_size=10
        )
        # (1 − ξ) · CE + ξ · KD with ξ = 1.5: the labels get weight −0.5.
        expected = -0.5 * self._ce().mean() + 1.5 * self._kd().mean()
        self.assertAlmostEqual(history.history["loss"][0], expected, places=5)
        self.assertAlmostEqual(
            history.history["supervised_loss"][0],
            -0.5 * self._ce().mean(),
            places=5,
        )
        self.assertNotIn("distillation_xi", history.history)

    def test_epoch_schedule_and_callback_change_weight(self):
        term = ksd.terms.Distillation(
            self.teacher,
            temperature=2.0,
            weight=ksd.schedules.LinearRampUp(ramp_up_epochs=2),
        )
        history = _fit_without_learning(
            ksd.Distiller(self.student, [term]), self.x, self.y, epochs=3
        )
        ce, kd = self._ce().mean(), self._kd().mean()
        np.testing.assert_allclose(
            history.history["loss"], [ce, ce + 0.5 * kd, ce + kd], rtol=1e-5
        )
        np.testing.assert_allclose(
            history.history["distillation_weight"], [0.0, 0.5, 1.0]
        )
        np.testing.assert_allclose(
            history.history["supervised_loss"], [ce] * 3, rtol=1e-5
        )
        constant = ksd.terms.Distillation(self.teacher, temperature=2.0)
        switch_off = keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs: setattr(
                constant, "weight", 0.0 if epoch == 1 else 1.0
            )
        )
        history = _fit_without_learning(
            ksd.Distiller(self.student, [constant]),
            self.x,
            self.y,
            epochs=2,
            callbacks=[switch_off],
        )
        np.testing.assert_allclose(
            history.history["loss"], [ce + kd, ce], rtol=1e-5
        )

    def test_step_schedule_follows_optimizer_iterations(self):
        term = ksd.terms.Distillation(
            self.teacher,
            temperature=2.0,
            weight=ksd.schedules.LinearRampUp(ramp_up_steps=2),
        )
        history = _fit_without_learning(
            ksd.Distiller(self.student, [term]),
            self.x,
            self.y,
            batch_size=5,
            epochs=2,
        )
        ce, kd = self._ce(), self._kd()
        first, second = kd[:5].mean(), kd[5:].mean()
        # Steps 0 and 1 (epoch 0) weigh KD by 0 and 0.5; steps 2, 3 by 1.
        np.testing.assert_allclose(
            history.history["loss"],
            [ce.mean() + 0.25 * second, ce.mean() + kd.mean()],
            rtol=1e-5,
        )
        self.assertGreater(abs(first - second), 1e-3)
        # Logged: the mean over each epoch's steps of the weight in force.
        np.testing.assert_allclose(
            history.history["distillation_weight"], [0.25, 1.0]
        )

    def test_scheduled_values_reach_progress_bar_and_tensorboard(self):
        xi = ksd.schedules.LinearRampUp(ramp_up_epochs=1, start=0.2, end=0.6)
        temperature = ksd.schedules.LinearRampUp(
            ramp_up_epochs=1, start=1.0, end=3.0
        )
        term = ksd.terms.Distillation(
            self.teacher, temperature=temperature, xi=xi
        )
        distiller = ksd.Distiller(self.student, [term])
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        log_dir = self.create_tempdir().full_path
        seen = []
        history = distiller.fit(
            self.x,
            self.y,
            epochs=2,
            verbose=0,
            validation_data=(self.x, self.y),
            callbacks=[
                keras.callbacks.TensorBoard(log_dir),
                keras.callbacks.LambdaCallback(
                    on_train_batch_end=lambda batch, logs: seen.append(
                        sorted(logs)
                    )
                ),
            ],
        )
        np.testing.assert_allclose(
            history.history["distillation_xi"], [0.2, 0.6]
        )
        np.testing.assert_allclose(
            history.history["distillation_temperature"], [1.0, 3.0]
        )
        self.assertIn("distillation_xi", seen[0])
        self.assertIn("supervised_loss", seen[0])
        for name in ("val_distillation_xi", "val_supervised_loss"):
            self.assertNotIn(name, history.history)
        tags = set()
        for root, _, files in os.walk(os.path.join(log_dir, "train")):
            for name in files:
                for event in tf.compat.v1.train.summary_iterator(
                    os.path.join(root, name)
                ):
                    tags.update(value.tag for value in event.summary.value)
        self.assertIn("epoch_distillation_xi", tags)
        self.assertIn("epoch_supervised_loss", tags)

    def test_no_supervised_loss_metric_without_terms_or_labels(self):
        plain = ksd.Distiller(self.student)
        history = _fit_without_learning(plain, self.x, self.y)
        self.assertNotIn("supervised_loss", history.history)
        label_free = ksd.Distiller(
            tiny.mlp(name="other", seed=3),
            [ksd.terms.Distillation(self.teacher)],
        )
        history = _fit_without_learning(label_free, self.x)
        self.assertNotIn("supervised_loss", history.history)
        self.assertIn("distillation_loss", history.history)

    def test_backup_and_restore_resumes_schedules_exactly(self):
        def train(callbacks):
            student = tiny.mlp(name="student", seed=2)
            distiller = ksd.Distiller(
                student,
                [
                    ksd.terms.Distillation(
                        self.teacher,
                        temperature=2.0,
                        weight=ksd.schedules.LinearRampUp(ramp_up_epochs=3),
                        xi=ksd.schedules.SigmoidRampUp(ramp_up_steps=9),
                    )
                ],
            )
            distiller.compile(
                optimizer=keras.optimizers.Adam(0.01), loss=tiny.sparse_ce()
            )
            distiller.fit(
                self.x,
                self.y,
                batch_size=4,
                epochs=4,
                shuffle=False,
                verbose=0,
                callbacks=callbacks,
            )
            return student.get_weights()

        class Interrupt(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                if epoch == 2:
                    raise RuntimeError("interrupted")

        expected = train([])
        backup = self.create_tempdir().full_path
        with self.assertRaisesRegex(RuntimeError, "interrupted"):
            train([keras.callbacks.BackupAndRestore(backup), Interrupt()])
        resumed = train([keras.callbacks.BackupAndRestore(backup)])
        for a, b in zip(expected, resumed):
            np.testing.assert_allclose(a, b, atol=1e-6)

    def test_label_free_distillation(self):
        distiller = ksd.Distiller(
            self.student,
            [ksd.terms.Distillation(self.teacher, temperature=2.0)],
        )
        distiller.compile(optimizer=keras.optimizers.Adam(0.05))
        history = distiller.fit(self.x, epochs=20, verbose=0)
        losses = history.history["distillation_loss"]
        self.assertLess(losses[-1], 0.5 * losses[0])
        np.testing.assert_allclose(history.history["loss"], losses, rtol=1e-5)

    def test_compiled_loss_without_labels_is_an_error(self):
        distiller = ksd.Distiller(
            self.student, [ksd.terms.Distillation(self.teacher)]
        )
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        with self.assertRaisesRegex(ValueError, "compile without `loss`"):
            distiller.fit(self.x, epochs=1, verbose=0)

    def test_teacher_does_not_run_at_evaluation(self):
        class CountingTeacher(keras.Model):
            def __init__(self, model):
                super().__init__()
                self.model = model
                # A variable of the teacher, so that JAX's stateless step
                # carries its updates.
                self.calls = keras.Variable(0.0, trainable=False)

            def call(self, x, training=False):
                self.calls.assign_add(1.0)
                return self.model(x, training=training)

        counting = CountingTeacher(self.teacher)
        # No data checks: they run the teacher once on the first batch.
        distiller = ksd.Distiller(
            self.student, [ksd.terms.Distillation(counting)], check_data=False
        )
        distiller.compile(
            optimizer="sgd", loss=tiny.sparse_ce(), metrics=["accuracy"]
        )
        history = distiller.fit(
            self.x,
            self.y,
            batch_size=5,
            validation_data=(self.x, self.y),
            verbose=0,
        )
        self.assertEqual(float(counting.calls), 2.0)
        self.assertNotIn("val_distillation_loss", history.history)
        logs = distiller.evaluate(self.x, self.y, return_dict=True, verbose=0)
        distiller.predict(self.x, verbose=0)
        self.assertEqual(float(counting.calls), 2.0)
        self.assertEqual(set(logs), {"loss", "accuracy"})

    def test_metrics_reach_callbacks_and_early_stopping(self):
        distiller = ksd.Distiller(
            self.student, [ksd.terms.Distillation(self.teacher, name="kd")]
        )
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        stop = keras.callbacks.EarlyStopping(
            monitor="kd_loss", patience=0, min_delta=1e9
        )
        history = distiller.fit(
            self.x, self.y, epochs=5, verbose=0, callbacks=[stop]
        )
        self.assertEqual(len(history.history["kd_loss"]), 2)

    def test_term_metric_reaches_tensorboard(self):
        distiller = ksd.Distiller(
            self.student, [ksd.terms.Distillation(self.teacher)]
        )
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        logs = self.create_tempdir().full_path
        distiller.fit(
            self.x,
            self.y,
            epochs=1,
            verbose=0,
            callbacks=[keras.callbacks.TensorBoard(logs)],
        )
        tags = set()
        for root, _, files in os.walk(os.path.join(logs, "train")):
            for name in files:
                for record in tf.data.TFRecordDataset(os.path.join(root, name)):
                    event = tf.compat.v1.Event.FromString(record.numpy())
                    tags.update(value.tag for value in event.summary.value)
        self.assertIn("epoch_distillation_loss", tags)

    def test_term_named_supervised_keeps_its_own_metric(self):
        term = ksd.terms.Distillation(self.teacher, name="supervised")
        history = _fit_without_learning(
            ksd.Distiller(self.student, [term]), self.x, self.y
        )
        np.testing.assert_allclose(
            history.history["supervised_1_loss"],
            [self._kd_at(1.0)],
            rtol=1e-5,
        )
        np.testing.assert_allclose(
            history.history["supervised_loss"], [self._ce().mean()], rtol=1e-5
        )

    def test_duplicate_term_names_get_distinct_metrics(self):
        distiller = ksd.Distiller(
            self.student,
            [
                ksd.terms.Distillation(self.teacher),
                ksd.terms.Distillation(tiny.mlp(seed=5)),
            ],
        )
        history = _fit_without_learning(distiller, self.x, self.y)
        self.assertIn("distillation_loss", history.history)
        self.assertIn("distillation_1_loss", history.history)

    def test_privileged_teacher_input(self):
        x_teacher = np.concatenate([self.x, self.y[:, None] * 1.0], axis=1)
        teacher = tiny.mlp(features=5, name="privileged", seed=3)
        distiller = ksd.Distiller(
            self.student,
            [
                ksd.terms.Distillation(
                    ksd.teachers.FrozenModel(teacher, input_key="teacher"),
                    temperature=2.0,
                )
            ],
            input_key="student",
        )
        history = _fit_without_learning(
            distiller,
            {"student": self.x, "teacher": x_teacher},
            self.y,
            batch_size=10,
        )
        expected = tiny.kd(
            teacher.predict(x_teacher, verbose=0),
            self.student.predict(self.x, verbose=0),
            2.0,
        ).mean()
        self.assertAlmostEqual(
            history.history["distillation_loss"][0], expected, places=5
        )
        np.testing.assert_allclose(
            distiller.predict(self.x, verbose=0),
            self.student.predict(self.x, verbose=0),
        )
        with self.assertRaisesRegex(ValueError, "have keys \\['student'\\]"):
            distiller.fit({"student": self.x}, self.y, verbose=0)

    def test_regularization_counts_student_not_teacher(self):
        teacher = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(
                    3, kernel_regularizer=keras.regularizers.L2(10.0)
                ),
            ]
        )
        student = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(
                    3, kernel_regularizer=keras.regularizers.L2(0.1)
                ),
            ]
        )
        distiller = ksd.Distiller(student, [ksd.terms.Distillation(teacher)])
        history = _fit_without_learning(
            distiller, self.x, self.y, batch_size=10
        )
        logits = student.predict(self.x, verbose=0)
        probs = tiny.softmax(np.float64(logits))
        ce = -np.log(probs[np.arange(10), self.y]).mean()
        kd = tiny.kd(teacher.predict(self.x, verbose=0), logits, 1.0).mean()
        l2 = 0.1 * np.sum(np.square(student.layers[0].kernel.numpy()))
        self.assertAlmostEqual(
            history.history["loss"][0], ce + kd + l2, places=4
        )

    def test_save_and_load_without_custom_objects(self):
        distiller = ksd.Distiller(
            self.student,
            [
                ksd.terms.Distillation(
                    self.teacher,
                    temperature=ksd.schedules.SigmoidRampUp(
                        ramp_up_steps=4, start=1.0, end=3.0
                    ),
                )
            ],
        )
        distiller.compile(
            optimizer="adam", loss=tiny.sparse_ce(), metrics=["accuracy"]
        )
        distiller.fit(self.x, self.y, epochs=2, verbose=0)
        path = os.path.join(self.create_tempdir().full_path, "d.keras")
        distiller.save(path)
        restored = keras.saving.load_model(path)
        self.assertIsInstance(restored, ksd.Distiller)
        self.assertIsInstance(
            restored.terms[0].temperature, ksd.schedules.SigmoidRampUp
        )
        np.testing.assert_allclose(
            restored.predict(self.x, verbose=0),
            distiller.predict(self.x, verbose=0),
        )
        # The counter holds the epochs trained, so training the loaded
        # distiller on without `initial_epoch` continues the schedules.
        self.assertEqual(int(restored.epoch), 2)
        restored.fit(self.x, self.y, epochs=1, verbose=0)
        self.assertEqual(int(restored.epoch), 3)

    @tiny.ONCE
    def test_student_loads_without_the_library(self):
        distiller = ksd.Distiller(
            self.student, [ksd.terms.Distillation(self.teacher)]
        )
        distiller.compile(optimizer="adam", loss=tiny.sparse_ce())
        distiller.fit(self.x, self.y, epochs=1, verbose=0)
        folder = self.create_tempdir().full_path
        path = os.path.join(folder, "student.keras")
        distiller.student.save(path)
        expected = distiller.student.predict(self.x, verbose=0)
        np.testing.assert_allclose(
            tiny.predict_without_library(path, self.x, folder),
            expected,
            rtol=1e-6,
        )

    def test_mixed_float16_keeps_loss_scaling_and_float32_terms(self):
        keras.config.set_dtype_policy("mixed_float16")
        teacher = tiny.mlp(hidden=16, name="teacher", seed=1)
        student = tiny.mlp(name="student", seed=2)
        distiller = ksd.Distiller(
            student, [ksd.terms.Distillation(teacher, temperature=2.0)]
        )
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.0), loss=tiny.sparse_ce()
        )
        self.assertIsInstance(
            distiller.optimizer, keras.optimizers.LossScaleOptimizer
        )
        history = distiller.fit(self.x, self.y, batch_size=10, verbose=0)
        self.assertEqual(student.layers[-1].compute_dtype, "float16")
        expected = tiny.kd(
            np.float32(teacher.predict(self.x, verbose=0)),
            np.float32(student.predict(self.x, verbose=0)),
            2.0,
        ).mean()
        self.assertAlmostEqual(
            history.history["distillation_loss"][0], expected, places=3
        )

    def test_rejects_bad_construction(self):
        with self.assertRaisesRegex(TypeError, "student must be"):
            ksd.Distiller(lambda x: x)
        with self.assertRaisesRegex(TypeError, "must be a list"):
            ksd.Distiller(self.student, ksd.terms.Distillation(self.teacher))
        with self.assertRaisesRegex(TypeError, "Every entry"):
            ksd.Distiller(self.student, [self.teacher])
        with self.assertRaisesRegex(ValueError, "teacher is the student"):
            ksd.Distiller(self.student, [ksd.terms.Distillation(self.student)])
        with self.assertRaisesRegex(ValueError, "At most one term"):
            ksd.Distiller(
                self.student,
                [
                    ksd.terms.Distillation(self.teacher, xi=0.5),
                    ksd.terms.Distillation(tiny.mlp(seed=4), xi=0.5),
                ],
            )

    def test_rejects_class_count_mismatch(self):
        wide = tiny.mlp(classes=5, seed=3)
        with self.assertRaisesRegex(ValueError, "predicts 5 classes"):
            ksd.Distiller(self.student, [ksd.terms.Distillation(wide)])

    def test_rejects_empty_dataset(self):
        distiller = ksd.Distiller(self.student)
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        empty = tf.data.Dataset.from_tensor_slices((self.x, self.y)).take(0)
        with self.assertRaisesRegex(ValueError, "empty"):
            distiller.fit(empty.batch(2), verbose=0)
        unknown_size = (
            tf.data.Dataset.from_tensor_slices((self.x, self.y))
            .filter(lambda x, y: y > 5)
            .batch(2)
        )
        with self.assertRaisesRegex(ValueError, "yielded no batch"):
            distiller.fit(unknown_size, verbose=0)
        with self.assertRaisesRegex(ValueError, "no samples"):
            distiller.fit(self.x[:0], self.y[:0], verbose=0)

    def test_rejects_labels_out_of_range(self):
        distiller = ksd.Distiller(self.student)
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        labels = self.y.copy()
        labels[3] = 7
        with self.assertRaisesRegex(ValueError, r"in \[0, 3\).*to 7"):
            distiller.fit(self.x, labels, verbose=0)
        dataset = tf.data.Dataset.from_tensor_slices((self.x, labels)).batch(5)
        # Checked in the input pipeline: also under XLA and on JAX.
        with self.assertRaisesRegex(
            tf.errors.InvalidArgumentError, r"indices in \[0, 3\).*\n?.*7"
        ):
            distiller.fit(dataset, verbose=0)
        distiller.compile(
            optimizer="sgd", loss=tiny.sparse_ce(), jit_compile=True
        )
        with self.assertRaisesRegex(
            tf.errors.InvalidArgumentError, r"indices in \[0, 3\).*\n?.*7"
        ):
            distiller.fit(dataset, verbose=0)

    def test_no_loss_at_all_is_an_error(self):
        distiller = ksd.Distiller(self.student)
        distiller.compile(optimizer="sgd")
        with self.assertRaisesRegex(ValueError, "Nothing to minimise"):
            distiller.fit(self.x, self.y, verbose=0)


class _AddsLoss(keras.layers.Layer):
    def call(self, x):
        self.add_loss(0.5 * keras.ops.mean(keras.ops.abs(x)))
        return x


def _regularized_student():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(
        4, 3, activation="relu", name="b1", activity_regularizer="l2"
    )(inputs)
    h = _AddsLoss()(h)
    h = keras.layers.Conv2D(4, 3, activation="relu", name="b2")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(
        3, kernel_regularizer=keras.regularizers.L2(0.1)
    )(h)
    return keras.Model(inputs, outputs)


class EveryLossTest(parameterized.TestCase):
    """Every loss of what ran in the step is minimised, on both backends."""

    def test_student_losses_match_plain_keras(self):
        x, y = tiny.images(n=12)
        plain = _regularized_student()
        plain.compile(
            optimizer=keras.optimizers.SGD(0.0), loss=tiny.sparse_ce()
        )
        expected = plain.fit(x, y, batch_size=12, verbose=0).history["loss"]
        distiller = ksd.Distiller(_regularized_student())
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.0), loss=tiny.sparse_ce()
        )
        got = distiller.fit(x, y, batch_size=12, verbose=0).history["loss"]
        ce = float(np.mean(tiny.sparse_ce()(y, plain.predict(x, verbose=0))))
        self.assertGreater(expected[0] - ce, 0.01)
        self.assertAlmostEqual(got[0], expected[0], places=4)

    def test_exit_head_regularizer_is_minimised(self):
        x, y = tiny.images(n=12)

        def head(name, shape, classes):
            return keras.Sequential(
                [
                    keras.layers.GlobalAveragePooling2D(),
                    keras.layers.Dense(
                        classes,
                        kernel_regularizer=keras.regularizers.L2(10.0),
                    ),
                ],
                name=f"{name}_head",
            )

        student = tiny.cnn()
        term = ksd.terms.AuxiliaryExits(["b1"], head=head)
        distiller = ksd.Distiller(student, [term])
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.0), loss=tiny.sparse_ce()
        )
        history = distiller.fit(x, y, batch_size=12, verbose=0).history
        kernel = np.asarray(distiller.exits.heads["b1"].layers[-1].kernel)
        penalty = 10.0 * np.sum(np.square(kernel))
        ce = float(np.mean(tiny.sparse_ce()(y, student.predict(x, verbose=0))))
        self.assertAlmostEqual(
            history["loss"][0],
            ce + history["auxiliary_exits_loss"][0] + penalty,
            places=3,
        )


class MonitoredCallbacksTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("past_predictions", lambda: ksd.teachers.PastPredictions(24, 3)),
        ("ema", lambda: ksd.teachers.EMA(momentum=0.9)),
        ("snapshot", lambda: ksd.teachers.Snapshot()),
        (
            "ensemble_with_ema",
            lambda: ksd.teachers.Ensemble(
                [tiny.mlp(seed=5), ksd.teachers.EMA(momentum=0.9)]
            ),
        ),
    )
    def test_self_teacher_term_cannot_be_monitored(self, make_teacher):
        self._assert_refused(ksd.terms.Distillation(make_teacher(), xi=0.5))

    def test_consistency_with_the_student_as_target_cannot_be_monitored(
        self,
    ):
        # Without a teacher, the target is the student's own weak view.
        term = ksd.terms.Consistency(keras.layers.Identity())
        self.assertTrue(term.follows_student)
        self._assert_refused(term)
        frozen = ksd.terms.Consistency(
            keras.layers.Identity(), teacher=tiny.mlp(seed=5)
        )
        self.assertFalse(frozen.follows_student)

    def _assert_refused(self, term):
        x, y = tiny.data()
        distiller = ksd.Distiller(tiny.mlp(), [term])
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        for callback in (
            keras.callbacks.EarlyStopping(monitor=f"{term.name}_loss"),
            keras.callbacks.ReduceLROnPlateau(monitor=f"{term.name}_loss"),
        ):
            with self.assertRaisesRegex(ValueError, "monitor='val_loss'"):
                distiller.fit(
                    ksd.data.with_sample_ids(x), y, callbacks=[callback]
                )

    @parameterized.named_parameters(
        ("frozen", lambda: tiny.mlp(seed=5)),
        ("random_init", lambda: ksd.teachers.RandomInit()),
    )
    def test_fixed_teacher_term_and_val_loss_can_be_monitored(
        self, make_teacher
    ):
        x, y = tiny.data()
        distiller = ksd.Distiller(
            tiny.mlp(), [ksd.terms.Distillation(make_teacher())]
        )
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        history = distiller.fit(
            x,
            y,
            validation_data=(x, y),
            epochs=2,
            verbose=0,
            callbacks=[
                keras.callbacks.EarlyStopping(monitor="distillation_loss"),
                keras.callbacks.EarlyStopping(monitor="val_loss"),
            ],
        ).history
        self.assertLen(history["loss"], 2)


class LabelFreeWeightsTest(parameterized.TestCase):
    def test_numpy_sample_weight_reaches_the_terms(self):
        # Zero learning rate, one batch: the logged term is the weighted
        # mean Σ w·kd / n of the per-sample KD.
        x, _ = tiny.data(n=12)
        w = np.linspace(0.0, 2.0, 12).astype("float32")
        teacher, student = tiny.mlp(seed=3), tiny.mlp()
        distiller = ksd.Distiller(
            student, [ksd.terms.Distillation(teacher, temperature=2.0)]
        )
        distiller.compile(optimizer=keras.optimizers.SGD(0.0))
        history = distiller.fit(
            x, sample_weight=w, batch_size=12, verbose=0
        ).history
        per_sample = tiny.kd(teacher(x), student(x), 2.0)
        self.assertAlmostEqual(
            history["distillation_loss"][0],
            float(np.mean(w * per_sample)),
            places=5,
        )


class Float64Test(parameterized.TestCase):
    def test_float64_student_trains_with_every_self_teacher(self):
        keras.config.set_floatx("float64")
        keras.config.set_dtype_policy("float64")
        try:
            x, y = tiny.data()
            for teacher in (
                tiny.mlp(seed=2),
                ksd.teachers.PastPredictions(24, 3),
                ksd.teachers.EMA(momentum=0.9),
                ksd.teachers.Snapshot(),
            ):
                student = tiny.mlp()
                distiller = ksd.Distiller(
                    student, [ksd.terms.Distillation(teacher, xi=0.5)]
                )
                distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
                history = distiller.fit(
                    ksd.data.with_sample_ids(x.astype("float64")),
                    y,
                    epochs=2,
                    verbose=0,
                ).history
                self.assertTrue(np.all(np.isfinite(history["loss"])))
                self.assertEqual(student.weights[0].dtype, "float64")
        finally:
            keras.config.set_floatx("float32")


class PerSampleLabelScaleTest(parameterized.TestCase):
    @parameterized.named_parameters(("flat", (24,)), ("column", (24, 1)))
    def test_unseen_samples_keep_full_label_weight(self, weight_shape):
        # Zero learning rate: the first fit stores rows 0–11; the second
        # sees all 24 with weights. Seen rows have p_prev = p (KL 0) and
        # label weight 1 − ξ; unseen rows keep weight 1:
        # loss = Σ w·(1 − ξ·seen)·CE / 24.
        x, y = tiny.data(n=24)
        w = np.linspace(0.5, 1.5, 24).astype("float32")
        student = tiny.mlp()
        bank = ksd.teachers.PastPredictions(24, 3, dtype="float32")
        distiller = ksd.Distiller(
            student, [ksd.terms.Distillation(bank, xi=0.4)]
        )
        inputs = ksd.data.with_sample_ids(x)
        first = {key: value[:12] for key, value in inputs.items()}
        _fit_without_learning(distiller, first, y[:12], batch_size=12)
        history = _fit_without_learning(
            distiller,
            inputs,
            y,
            batch_size=24,
            sample_weight=w.reshape(weight_shape),
        ).history
        per_sample = -np.log(
            tiny.softmax(np.asarray(student(x)))[np.arange(24), y]
        )
        seen = np.arange(24) < 12
        expected = np.mean(w * (1 - 0.4 * seen) * per_sample)
        self.assertAlmostEqual(history["loss"][0], expected, places=5)
