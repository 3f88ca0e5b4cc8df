"""The bad-input catalogue: data mistakes caught before or beside the step.

Each test feeds `fit` one mistake and checks the error names the problem
and the fix. The "Bad input catalogue"
(docs/errors.md) lists these with the
construction-time errors tested beside each class.
"""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny

# Raised by the input pipeline: the same error on both backends and under
# XLA, where the compiled step itself cannot raise.
PIPELINE = tf.errors.InvalidArgumentError


def _distiller(terms=(), jit_compile=False, student=None):
    distiller = ksd.Distiller(student or tiny.mlp(), list(terms))
    distiller.compile(
        optimizer="sgd", loss=tiny.sparse_ce(), jit_compile=jit_compile
    )
    return distiller


def _bank_distiller(num_samples=24):
    bank = ksd.teachers.PastPredictions(num_samples, 3, dtype="float32")
    return _distiller([ksd.terms.Distillation(bank, xi=0.5)])


class BadInputTest(parameterized.TestCase):
    def setUp(self):
        self.x, self.y = tiny.data(n=24)

    def test_unbatched_dataset(self):
        dataset = tf.data.Dataset.from_tensor_slices((self.x, self.y))
        with self.assertRaisesRegex(ValueError, r"unbatched.*\.batch\(32\)"):
            _distiller().fit(dataset, verbose=0)

    def test_nan_in_numpy_inputs(self):
        self.x[3, 1] = np.nan
        with self.assertRaisesRegex(ValueError, "NaN or infinite.*1 non"):
            _distiller().fit(self.x, self.y, verbose=0)

    def test_bad_batch_from_a_python_generator(self):
        def batches():
            for start in range(0, 24, 8):
                labels = self.y[start : start + 8].copy()
                if start == 16:
                    labels[0] = 9
                yield self.x[start : start + 8], labels

        # TensorFlow's generator adapter reraises it as InvalidArgumentError.
        errors = (ValueError, PIPELINE)
        with self.assertRaisesRegex(errors, r"\[0, 3\).*to 9"):
            _distiller().fit(batches(), verbose=0)

    # The passes counted below are TensorFlow's (JAX's trainer reads the
    # dataset once more before training); the check itself is the host's.
    @tiny.ONCE
    def test_nan_inputs_of_a_later_epoch_stop_fit_at_its_end(self):
        # A dataset of known size, checked over its first pass, whose
        # inputs turn NaN in the pass the second epoch reads (the passes:
        # `fit`'s look at the first batch, the checked first pass, then
        # the second epoch's).
        passes = []

        def poison(index, x):
            passes.extend([1] if index == 0 else [])
            return x + np.float32("nan" if len(passes) >= 3 else 0)

        dataset = (
            tf.data.Dataset.from_tensor_slices((self.x, self.y))
            .enumerate()
            .map(
                lambda i, xy: (
                    tf.ensure_shape(
                        tf.numpy_function(poison, [i, xy[0]], tf.float32), (4,)
                    ),
                    xy[1],
                )
            )
        )
        # A linear student: TensorFlow's oneDNN kernel for a fused
        # MatMul, BiasAdd and ReLU turns NaN into 0 on some CPUs (AVX-512
        # machines here), so NaN inputs gave a finite loss through the
        # ReLU of `tiny.mlp`.
        student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        distiller = _distiller(student=student)
        with self.assertRaisesRegex(
            ValueError, r"not finite in epoch 1: \{'loss': nan\}.*checkpoint"
        ):
            distiller.fit(dataset.batch(8), epochs=3, verbose=0)
        self.assertEqual(int(keras.ops.convert_to_numpy(distiller.epoch)), 1)

    @parameterized.named_parameters(
        ("weight", "weight", lambda step: 1.0 - 0.5 * step, "must be >= 0"),
        ("temperature", "temperature", lambda step: 3.0 - step, "must be > 0"),
    )
    def test_a_schedule_out_of_range_is_held_and_stops_fit(
        self, name, schedule, message
    ):
        # Not knowable before training (a plain function of the step): the
        # step holds it to its bound (no maximised term, no division by
        # zero), and the epoch's end names the step and the value.
        term = ksd.terms.Distillation(
            tiny.mlp(seed=1),
            **{name: lambda step: schedule(keras.ops.cast(step, "float32"))},
        )
        distiller = _distiller([term])
        with self.assertRaisesRegex(
            ValueError, f"`{name}` .*optimizer step 3 of epoch 0 {message}"
        ):
            distiller.fit(self.x, self.y, batch_size=4, verbose=0)
        for weight in distiller.student.get_weights():
            self.assertTrue(np.isfinite(weight).all())
        # Where the range is known, before training.
        decay = keras.optimizers.schedules.PolynomialDecay(1.0, 10, -1.0)
        with self.assertRaisesRegex(ValueError, "lowest value must be >= 0"):
            ksd.terms.Distillation(tiny.mlp(seed=1), weight=decay)

    def test_checks_can_be_turned_off(self):
        self.x[3, 1] = np.nan
        distiller = ksd.Distiller(tiny.mlp(), check_data=False)
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        # Trains (on whatever the NaN does) instead of failing.
        self.assertLen(distiller.fit(self.x, self.y, verbose=0).epoch, 1)
        dataset = tf.data.Dataset.from_tensor_slices((self.x, self.y))
        self.assertLen(distiller.fit(dataset.batch(8), verbose=0).epoch, 1)
        restored = ksd.Distiller.from_config(distiller.get_config())
        self.assertFalse(restored.check_data)

    def test_a_dataset_is_checked_over_its_first_pass(self):
        dataset = tf.data.Dataset.from_tensor_slices((self.x, self.y))
        dataset = dataset.shuffle(24, seed=0).batch(8)
        _, given = tiny.fit_arguments(_distiller(), dataset, epochs=3)
        # One pass checked, then the dataset as given, one pass an epoch.
        self.assertEqual(given["steps_per_epoch"], 3)
        epochs = [
            np.concatenate(
                [np.asarray(x) for x, _ in given["x"].skip(i).take(3)]
            )
            for i in (0, 3, 6)
        ]
        for epoch in epochs:
            np.testing.assert_array_equal(
                np.sort(epoch, axis=0), np.sort(self.x, axis=0)
            )
        self.assertFalse(np.array_equal(epochs[1], epochs[2]))
        # Where a pass is not an epoch, or there is one epoch, every batch.
        for data, arguments in (
            (dataset, {"epochs": 1}),
            (dataset.repeat(3), {"epochs": 3, "steps_per_epoch": 3}),
            (dataset.repeat(), {"epochs": 2, "steps_per_epoch": 3}),
            (dataset.filter(lambda x, y: True), {"epochs": 2}),
        ):
            _, given = tiny.fit_arguments(_distiller(), data, **arguments)
            self.assertEqual(
                given.get("steps_per_epoch"),
                arguments.get("steps_per_epoch"),
            )
        # An execution of several steps must end where a pass ends.
        for batch, split in ((8, False), (6, True)):
            distiller = ksd.Distiller(tiny.mlp())
            distiller.compile(
                optimizer="sgd", loss=tiny.sparse_ce(), steps_per_execution=2
            )
            data = tf.data.Dataset.from_tensor_slices((self.x, self.y))
            _, given = tiny.fit_arguments(
                distiller, data.batch(batch), epochs=2
            )
            self.assertEqual(given.get("steps_per_epoch"), 4 if split else None)
        self.x[20, 1] = np.nan
        dataset = tf.data.Dataset.from_tensor_slices((self.x, self.y))
        with self.assertRaisesRegex(PIPELINE, "NaN or infinite"):
            _distiller().fit(dataset.batch(8), epochs=3, verbose=0)

    @parameterized.named_parameters(("eager", False), ("xla", True))
    def test_nan_in_dataset_inputs(self, jit_compile):
        self.x[3, 1] = np.inf
        dataset = tf.data.Dataset.from_tensor_slices((self.x, self.y))
        with self.assertRaisesRegex(PIPELINE, "NaN or infinite"):
            _distiller(jit_compile=jit_compile).fit(dataset.batch(8), verbose=0)

    def test_float_labels_for_a_sparse_loss(self):
        labels = self.y.astype("float32") + 0.5
        with self.assertRaisesRegex(ValueError, r"class indices.*0.5 to"):
            _distiller().fit(self.x, labels, verbose=0)
        dataset = tf.data.Dataset.from_tensor_slices((self.x, labels))
        with self.assertRaisesRegex(PIPELINE, "class indices"):
            _distiller().fit(dataset.batch(8), verbose=0)

    def test_nan_labels(self):
        labels = self.y.astype("float32")
        labels[0] = np.nan
        with self.assertRaisesRegex(ValueError, "NaN labels"):
            _distiller().fit(self.x, labels, verbose=0)

    @parameterized.named_parameters(("eager", False), ("xla", True))
    def test_negative_labels_in_dataset(self, jit_compile):
        labels = self.y.copy()
        labels[5] = -1
        dataset = tf.data.Dataset.from_tensor_slices((self.x, labels))
        with self.assertRaisesRegex(PIPELINE, r"(?s)\[0, 3\).*-1"):
            _distiller(jit_compile=jit_compile).fit(dataset.batch(8), verbose=0)

    def test_sample_ids_missing(self):
        with self.assertRaisesRegex(ValueError, "with_sample_ids"):
            _bank_distiller().fit(self.x, self.y, verbose=0)

    def test_sample_ids_out_of_range_in_arrays(self):
        inputs = {"inputs": self.x, "sample_id": np.arange(24) + 1}
        with self.assertRaisesRegex(ValueError, "num_samples=24.*1 to 24"):
            _bank_distiller().fit(inputs, self.y, verbose=0)

    def test_bank_inside_an_ensemble_gets_the_id_checks(self):
        # The bank holds 12 rows, the data 24 ids: under XLA an
        # out-of-range id would gather silently, so the pipeline refuses it.
        ensemble = ksd.teachers.Ensemble(
            [tiny.mlp(seed=4), ksd.teachers.PastPredictions(12, 3)]
        )
        distiller = _distiller(
            [ksd.terms.Distillation(ensemble, xi=0.5)], jit_compile=True
        )
        dataset = ksd.data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices((self.x, self.y))
        ).batch(8)
        with self.assertRaisesRegex(PIPELINE, "num_samples=12"):
            distiller.fit(dataset, verbose=0)
        with self.assertRaisesRegex(ValueError, "num_samples=12"):
            distiller.fit(ksd.data.with_sample_ids(self.x), self.y, verbose=0)

    def test_sample_ids_repeated_in_arrays(self):
        inputs = {"inputs": self.x, "sample_id": np.arange(24) % 12}
        with self.assertRaisesRegex(ValueError, "repeated"):
            _bank_distiller().fit(inputs, self.y, verbose=0)

    @parameterized.named_parameters(("eager", False), ("xla", True))
    def test_sample_ids_repeated_in_dataset(self, jit_compile):
        dataset = ksd.data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices((self.x, self.y))
        )
        # Ids attached before `repeat`: a batch holds the same ids twice.
        repeated = dataset.take(4).repeat(2).batch(8)
        distiller = _bank_distiller()
        distiller.compile(
            optimizer="sgd", loss=tiny.sparse_ce(), jit_compile=jit_compile
        )
        with self.assertRaisesRegex(PIPELINE, "unique within a batch"):
            distiller.fit(repeated, verbose=0)

    def test_sample_ids_beyond_the_bank_in_dataset(self):
        dataset = ksd.data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices((self.x, self.y))
        )
        with self.assertRaisesRegex(PIPELINE, r"num_samples=20\)"):
            _bank_distiller(num_samples=20).fit(dataset.batch(8), verbose=0)

    def test_ids_added_after_batching(self):
        batched = tf.data.Dataset.from_tensor_slices((self.x, self.y)).batch(8)
        with self.assertRaisesRegex(ValueError, "before batching"):
            _bank_distiller().fit(ksd.data.with_sample_ids(batched), verbose=0)

    def test_teacher_with_nan_weights(self):
        teacher = tiny.mlp(seed=1)
        kernel = teacher.layers[0].kernel
        kernel.assign(np.full(kernel.shape, np.nan, "float32"))
        distiller = _distiller([ksd.terms.Distillation(teacher)])
        with self.assertRaisesRegex(ValueError, "NaN or infinite weights"):
            distiller.fit(self.x, self.y, verbose=0)

    def test_schedule_returning_a_vector(self):
        class Vector(ksd.schedules.Schedule):
            def __call__(self, step, epoch):
                return keras.ops.ones((2,))

            def value_range(self):
                return 1.0, 1.0

            def get_config(self):
                return {}

        term = ksd.terms.Distillation(tiny.mlp(seed=1), weight=Vector())
        with self.assertRaisesRegex(ValueError, "must return a scalar"):
            _distiller([term]).fit(self.x, self.y, verbose=0)

    def test_one_hot_labels_with_a_sparse_loss(self):
        one_hot = np.eye(3, dtype="float32")[self.y]
        with self.assertRaisesRegex(ValueError, "one-hot.*argmax"):
            _distiller().fit(self.x, one_hot, verbose=0)
        dataset = tf.data.Dataset.from_tensor_slices((self.x, one_hot))
        with self.assertRaisesRegex(ValueError, "CategoricalCrossentropy"):
            _distiller().fit(dataset.batch(8), verbose=0)


def _softmax_mlp(seed=0):
    model = tiny.mlp(seed=seed)
    return keras.Sequential(
        model.layers[:-1] + [keras.layers.Dense(3, activation="softmax")]
    )


class ProbabilityOutputsTest(parameterized.TestCase):
    # Refused from the model's graph, before any backend computes: once.
    @tiny.ONCE
    def test_keras_applications_teacher_is_refused(self):
        teacher = keras.applications.MobileNetV3Small(
            input_shape=(32, 32, 3),
            weights=None,
            classes=3,
            include_preprocessing=False,
            minimalistic=True,
        )
        with self.assertRaisesRegex(ValueError, "classifier_activation=None"):
            ksd.teachers.FrozenModel(teacher)

    def test_softmax_student_is_refused(self):
        with self.assertRaisesRegex(ValueError, "student .* softmax"):
            ksd.Distiller(_softmax_mlp(), [ksd.terms.Distillation(tiny.mlp())])
        # Plain supervised training of a softmax model is fine.
        ksd.Distiller(_softmax_mlp())

    def test_from_logits_false_gives_the_logits_targets(self):
        logits_model = tiny.mlp(seed=4)
        probs_model = keras.Sequential(
            [logits_model, keras.layers.Softmax()], name="probs"
        )
        x, _ = tiny.data(n=5)
        teacher = ksd.teachers.FrozenModel(probs_model, from_logits=False)
        got = tiny.softmax(np.asarray(teacher.targets(x, None, 1.0)))
        np.testing.assert_allclose(
            got, tiny.softmax(np.asarray(logits_model(x))), atol=1e-5
        )
        restored = ksd.teachers.FrozenModel.from_config(teacher.get_config())
        self.assertFalse(restored.from_logits)

    def test_probabilities_from_an_unseen_layer_fail_on_the_first_batch(self):
        # A Lambda softmax hides the activation; the first batch shows it.
        hidden = keras.Sequential(
            [tiny.mlp(seed=2), keras.layers.Lambda(keras.ops.softmax)]
        )
        x, y = tiny.data()
        distiller = _distiller([ksd.terms.Distillation(hidden)])
        with self.assertRaisesRegex(ValueError, "teacher .* probabilities"):
            distiller.fit(x, y, verbose=0)
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        with self.assertRaisesRegex(ValueError, "teacher .* probabilities"):
            distiller.fit(dataset, verbose=0)
