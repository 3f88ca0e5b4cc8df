import keras
import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd
from keras_selfdistill import ops as ksd_ops
from keras_selfdistill import schedules
from keras_selfdistill import teachers
from keras_selfdistill import terms
from tests import tiny


class DistillationTest(parameterized.TestCase):
    def setUp(self):
        self.x, _ = tiny.data(n=5)
        self.teacher = tiny.mlp(name="teacher", seed=1)
        self.teacher_logits = keras.ops.convert_to_numpy(self.teacher(self.x))
        rng = np.random.default_rng(7)
        self.student_logits = rng.normal(size=(5, 3)).astype("float32")

    def test_config(self):
        term = terms.Distillation(
            self.teacher,
            loss="jsd",
            temperature=schedules.LinearRampUp(ramp_up_steps=5, start=1, end=4),
            weight=0.5,
            xi=0.3,
            beta=0.2,
            name="kd",
        )
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(term)
        )
        self.assertIsInstance(restored, terms.Distillation)
        self.assertIsInstance(restored.teacher, teachers.FrozenModel)
        self.assertIsInstance(restored.temperature, schedules.LinearRampUp)
        self.assertEqual(restored.name, "kd")
        self.assertEqual(restored.loss, "jsd")
        self.assertAlmostEqual(restored.weight, 0.5)
        self.assertAlmostEqual(restored.xi, 0.3, places=6)
        self.assertEqual(restored.beta, 0.2)

    @parameterized.named_parameters(("t1", 1.0), ("t2", 2.0), ("t4", 4.0))
    def test_loss_matches_numpy(self, temperature):
        term = terms.Distillation(self.teacher, temperature=temperature)
        got = term.compute_loss(
            self.x, None, self.student_logits, None, step=0, epoch=0
        )
        expected = tiny.kd(
            self.teacher_logits, self.student_logits, temperature
        ).mean()
        self.assertAlmostEqual(float(got), expected, places=5)

    def test_zero_sample_weight_removes_sample(self):
        term = terms.Distillation(self.teacher, temperature=2.0)
        weights = np.array([1.0, 2.0, 0.0, 1.0, 1.0], "float32")
        per_sample = tiny.kd(self.teacher_logits, self.student_logits, 2.0)
        # Keras's "sum_over_batch_size": Σ w_i l_i / batch size.
        expected = np.sum(weights * per_sample) / 5
        got = term.compute_loss(
            self.x, None, self.student_logits, weights, 0, 0
        )
        self.assertAlmostEqual(float(got), expected, places=5)
        perturbed = self.student_logits.copy()
        perturbed[2] += np.array([9.0, -9.0, 3.0], "float32")
        again = term.compute_loss(self.x, None, perturbed, weights, 0, 0)
        self.assertAlmostEqual(float(again), float(got), places=6)

    def test_zero_when_student_equals_teacher(self):
        term = terms.Distillation(self.teacher, temperature=4.0)
        got = term.compute_loss(self.x, None, self.teacher_logits, None, 0, 0)
        self.assertAlmostEqual(float(got), 0.0, places=6)

    @parameterized.named_parameters(
        ("reverse_kl", "reverse_kl", None),
        ("jsd", "jsd", 0.25),
        ("mse", "mse", None),
    )
    def test_other_losses_use_their_formula(self, loss, beta):
        temperature = 1.0 if loss == "mse" else 2.0
        term = terms.Distillation(
            self.teacher, loss=loss, temperature=temperature, beta=beta
        )
        got = term.compute_loss(self.x, None, self.student_logits, None, 0, 0)
        t, s = self.teacher_logits, self.student_logits
        if loss == "reverse_kl":
            expected = tiny.kd(s, t, 2.0).mean()
        elif loss == "jsd":
            expected = np.mean(ksd_ops.generalized_jsd(t, s, 0.25, 2.0))
        else:
            expected = np.mean((t - s) ** 2)
        self.assertAlmostEqual(float(got), float(expected), places=5)

    def test_temperature_can_be_reassigned(self):
        term = terms.Distillation(self.teacher, temperature=1.0)
        term.temperature = 4.0
        got = term.compute_loss(self.x, None, self.student_logits, None, 0, 0)
        expected = tiny.kd(self.teacher_logits, self.student_logits, 4.0)
        self.assertAlmostEqual(float(got), expected.mean(), places=5)
        with self.assertRaisesRegex(ValueError, "temperature=-1"):
            term.temperature = -1.0
        with self.assertRaisesRegex(TypeError, "construction"):
            term.temperature = schedules.LinearRampUp(ramp_up_steps=3)

    def test_scheduled_hyperparameter_cannot_be_reassigned(self):
        term = terms.Distillation(
            self.teacher, weight=schedules.SigmoidRampUp(ramp_up_steps=3)
        )
        with self.assertRaisesRegex(TypeError, "created as SigmoidRampUp"):
            term.weight = 0.5

    @parameterized.named_parameters(
        ("zero", 0.0, "temperature=0"),
        ("negative", -2.0, "temperature=-2"),
        ("nan", float("nan"), "temperature=nan"),
    )
    def test_rejects_bad_temperature(self, temperature, message):
        with self.assertRaisesRegex(ValueError, message):
            terms.Distillation(self.teacher, temperature=temperature)

    def test_rejects_schedule_reaching_zero_temperature(self):
        with self.assertRaisesRegex(ValueError, "lowest value"):
            terms.Distillation(
                self.teacher,
                temperature=schedules.LinearRampUp(ramp_up_steps=3),
            )

    def test_rejects_negative_weight(self):
        with self.assertRaisesRegex(ValueError, "weight=-0.1"):
            terms.Distillation(self.teacher, weight=-0.1)

    def test_rejects_unknown_loss_listing_valid_ones(self):
        with self.assertRaisesRegex(ValueError, "'kl', 'reverse_kl'.*'kld'"):
            terms.Distillation(self.teacher, loss="kld")

    def test_rejects_teacher_that_is_not_a_model(self):
        with self.assertRaisesRegex(TypeError, "Received: teacher="):
            terms.Distillation(lambda x: x)

    def test_rejects_ignored_arguments(self):
        with self.assertRaisesRegex(ValueError, "applies to loss=.jsd. and"):
            terms.Distillation(self.teacher, beta=0.5)
        with self.assertRaisesRegex(ValueError, "no effect"):
            terms.Distillation(self.teacher, loss="mse", temperature=2.0)

    def test_rejects_shape_mismatch_when_traced(self):
        term = terms.Distillation(self.teacher)
        with self.assertRaisesRegex(ValueError, "same number of classes"):
            term.compute_loss(
                self.x, None, np.zeros((5, 4), "float32"), None, 0, 0
            )


class MidEpochAssignmentTest(parameterized.TestCase):
    def test_callback_changes_weight_mid_epoch(self):
        # On JAX the step state lives outside the variables mid-epoch: the
        # assignment must reach the next step and survive the epoch's end.
        x, y = tiny.data(n=24)
        term = ksd.terms.Distillation(tiny.mlp(seed=3), weight=1.0)
        distiller = ksd.Distiller(tiny.mlp(), [term])
        distiller.compile(optimizer="sgd", loss=tiny.sparse_ce())
        seen = []

        class Halve(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                seen.append(term.weight)
                term.weight = term.weight / 2

        distiller.fit(
            x, y, batch_size=8, epochs=2, verbose=0, callbacks=[Halve()]
        )
        self.assertEqual(seen, [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125])
        self.assertAlmostEqual(term.weight, 0.015625)


class MisuseTest(parameterized.TestCase):
    def test_single_logit_binary_models_are_refused(self):
        binary = tiny.mlp(classes=1)
        with self.assertRaisesRegex(ValueError, "single logit"):
            ksd.Distiller(binary, [ksd.terms.Distillation(tiny.mlp(classes=1))])
        term = ksd.terms.Distillation(tiny.mlp(classes=1))
        logits = np.zeros((4, 1), "float32")
        with self.assertRaisesRegex(ValueError, "single logit"):
            term.compute_loss(np.zeros((4, 4)), None, logits, None, 0, 0)
        ksd.Distiller(
            tiny.mlp(classes=1),
            [ksd.terms.Distillation(tiny.mlp(classes=1), loss="mse")],
        )

    def test_unbuilt_subclassed_student_is_refused_by_self_teachers(self):
        class Subclassed(keras.Model):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.dense = keras.layers.Dense(3)

            def call(self, x):
                return self.dense(x)

            def get_config(self):
                return {"name": self.name}

        for teacher in (
            ksd.teachers.EMA(momentum=0.9),
            ksd.teachers.Snapshot(),
            ksd.teachers.RandomInit(),
        ):
            with self.assertRaisesRegex(ValueError, "student.build"):
                ksd.Distiller(Subclassed(), [ksd.terms.Distillation(teacher)])
        student = Subclassed()
        student(np.zeros((1, 4), "float32"))
        ema = ksd.teachers.EMA(momentum=0.9)
        ksd.Distiller(student, [ksd.terms.Distillation(ema)])
        for copy, original in zip(ema.model.weights, student.weights):
            np.testing.assert_array_equal(copy, original)


class LargeTemperatureTest(parameterized.TestCase):
    def test_compiled_step_is_precise_at_large_temperature(self):
        # Inside the compiled step the temperature is a traced value, so
        # the precise branch runs under a cond; one batch, no learning.
        x, y = tiny.data(n=12)
        teacher, student = tiny.mlp(seed=3), tiny.mlp()
        distiller = ksd.Distiller(
            student, [ksd.terms.Distillation(teacher, temperature=1e3)]
        )
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.0), loss=tiny.sparse_ce()
        )
        history = distiller.fit(x, y, batch_size=12, verbose=0).history
        expected = tiny.kd(teacher(x), student(x), 1e3).mean()
        self.assertAlmostEqual(
            history["distillation_loss"][0] / expected, 1.0, places=3
        )


class LogitVariantsTest(parameterized.TestCase):
    def setUp(self):
        self.x, _ = tiny.data(n=5)
        self.y = np.array([0, 1, 2, 1, 0])
        self.teacher = tiny.mlp(name="teacher", seed=1)
        self.t = keras.ops.convert_to_numpy(self.teacher(self.x))
        self.s = np.random.default_rng(7).normal(size=(5, 3)).astype("f4")

    def test_config(self):
        term = terms.Distillation(
            self.teacher, loss="dkd", beta=2.0, standardize=True
        )
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(term)
        )
        self.assertEqual((restored.loss, restored.beta), ("dkd", 2.0))
        self.assertTrue(restored.standardize)

    @parameterized.named_parameters(
        ("sparse", lambda y: y), ("one_hot", lambda y: np.eye(3)[y])
    )
    def test_dkd_matches_numpy(self, labels):
        term = terms.Distillation(self.teacher, loss="dkd", temperature=4.0)
        got = term.compute_loss(self.x, labels(self.y), self.s, None, 0, 0)
        # The default beta is DKD's 8; the float64 DKD is in ops_test.
        expected = ksd_ops.decoupled_kl(
            self.t, self.s, np.eye(3, dtype="f4")[self.y], 8.0, 4.0
        )
        self.assertAlmostEqual(float(got), float(np.mean(expected)), places=5)

    def test_dkd_leaves_out_samples_without_a_label(self):
        term = terms.Distillation(self.teacher, loss="dkd")
        labels = np.array([0, 1, -1, 1, 0])
        got = term.compute_loss(self.x, labels, self.s, None, 0, 0)
        per_sample = ksd_ops.decoupled_kl(
            self.t, self.s, np.eye(3, dtype="f4")[self.y], 8.0
        )
        expected = np.sum(np.delete(np.asarray(per_sample), 2)) / 5
        self.assertAlmostEqual(float(got), expected, places=5)

    def test_standardized_kd_matches_numpy_and_ignores_logit_scale(self):
        term = terms.Distillation(
            self.teacher, temperature=2.0, standardize=True
        )

        def z(v):
            v = v.astype("float64")
            centred = v - v.mean(-1, keepdims=True)
            return centred / (v.std(-1, ddof=1, keepdims=True) + 1e-7)

        got = term.compute_loss(self.x, None, self.s, None, 0, 0)
        expected = tiny.kd(z(self.t), z(self.s), 2.0).mean()
        self.assertAlmostEqual(float(got), expected, places=5)
        scaled = term.compute_loss(self.x, None, 5.0 * self.s + 2, None, 0, 0)
        self.assertAlmostEqual(float(scaled), float(got), places=5)

    def test_dkd_without_labels_or_with_a_bad_beta_is_refused(self):
        term = terms.Distillation(self.teacher, loss="dkd")
        with self.assertRaisesRegex(ValueError, "needs labels"):
            term.compute_loss(self.x, None, self.s, None, 0, 0)
        with self.assertRaisesRegex(ValueError, "must be a number >= 0"):
            terms.Distillation(self.teacher, loss="dkd", beta=-1.0)
        with self.assertRaisesRegex(TypeError, "standardize="):
            terms.Distillation(self.teacher, standardize="yes")


class DKDRecipeTest(parameterized.TestCase):
    def test_published_warm_up_and_weights(self):
        term = ksd.recipes.dkd(tiny.mlp(seed=1), alpha=0.5, beta=4.0)
        # mdistiller: min(epoch / 20, 1) · 0.5 with epochs counted from 1.
        for epoch in (0, 9, 19, 30):
            self.assertAlmostEqual(
                float(term.hyperparameter("weight", 0, epoch)),
                0.5 * min((epoch + 1) / 20, 1.0),
                places=6,
            )
        self.assertEqual((term.loss, term.beta, term.name), ("dkd", 8.0, "dkd"))
        self.assertAlmostEqual(term.temperature, 4.0)
        with self.assertRaisesRegex(ValueError, "alpha=0"):
            ksd.recipes.dkd(tiny.mlp(seed=1), alpha=0)


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _numpy_loss(loss, t, s, temperature, labels=None):
    """Per-position losses in float64, from the papers' formulas."""
    log_p = _log_softmax(np.float64(t) / temperature)
    log_q = _log_softmax(np.float64(s) / temperature)
    p, q = np.exp(log_p), np.exp(log_q)
    if loss == "kl":
        return temperature**2 * np.sum(p * (log_p - log_q), -1)
    if loss == "reverse_kl":
        return temperature**2 * np.sum(q * (log_q - log_p), -1)
    if loss == "jsd":
        m = 0.3 * p + 0.7 * q
        return temperature**2 * (
            0.3 * np.sum(p * np.log(p / m), -1)
            + 0.7 * np.sum(q * np.log(q / m), -1)
        )
    if loss == "mse":
        return np.mean((np.float64(s) - t) ** 2, -1)
    # DKD: binary KL of [p_g, 1 − p_g] plus β · KL over the other classes,
    # renormalised (Zhao et al., 2022, eq. 7).
    g = np.eye(t.shape[-1])[np.maximum(labels, 0)].astype(bool)
    pg, qg = p[g].reshape(labels.shape), q[g].reshape(labels.shape)
    tckd = pg * np.log(pg / qg) + (1 - pg) * np.log((1 - pg) / (1 - qg))
    p_other = np.where(g, 0, p) / (1 - pg)[..., None]
    q_other = np.where(g, 0, q) / (1 - qg)[..., None]
    ratio = np.log(np.where(g, 1, p_other) / np.where(g, 1, q_other))
    nckd = np.sum(np.where(g, 0, p_other * ratio), -1)
    return temperature**2 * (tckd + 2.0 * nckd) * (labels >= 0)


class SequenceTest(parameterized.TestCase):
    """Token-level distillation on `[batch, sequence, vocabulary]` logits."""

    def setUp(self):
        rng = np.random.default_rng(3)
        self.teacher_logits = rng.normal(size=(3, 6, 11)).astype("float32") * 2
        self.student_logits = rng.normal(size=(3, 6, 11)).astype("float32") * 2
        lengths = np.array([[6], [3], [1]])
        self.mask = (np.arange(6) < lengths).astype("float32")
        self.labels = rng.integers(0, 11, size=(3, 6))
        self.labels[self.mask == 0] = -100
        logits = keras.Input((6, 11), name="logits")
        self.teacher = keras.Model(logits, keras.layers.Identity()(logits))

    def _term(self, loss, **kwargs):
        if loss in ("jsd", "dkd"):
            kwargs["beta"] = {"jsd": 0.3, "dkd": 2.0}[loss]
        temperature = 1.0 if loss == "mse" else 2.0
        return terms.Distillation(
            self.teacher, loss=loss, temperature=temperature, **kwargs
        )

    @parameterized.product(
        loss=["kl", "reverse_kl", "jsd", "mse", "dkd"],
        reduction=["sum_over_batch_size", "mean_with_sample_weight"],
        chunked=[False, True],
    )
    def test_matches_numpy_with_ragged_padding(self, loss, reduction, chunked):
        term = self._term(loss, reduction=reduction)
        if chunked:
            term._chunk_elements = 4 * 11
        got = term.compute_loss(
            self.teacher_logits,
            self.labels,
            self.student_logits,
            self.mask,
            0,
            0,
        )
        values = _numpy_loss(
            loss,
            self.teacher_logits,
            self.student_logits,
            1.0 if loss == "mse" else 2.0,
            self.labels,
        )
        # Keras's reductions: over all 18 positions (as the compiled
        # cross-entropy with these weights), or over the 10 real tokens.
        divisor = self.mask.size
        if reduction == "mean_with_sample_weight":
            divisor = self.mask.sum()
        expected = np.sum(values * self.mask) / divisor
        np.testing.assert_allclose(got, expected, rtol=1e-5)

    @parameterized.named_parameters(("kl", "kl"), ("dkd", "dkd"))
    def test_padding_positions_change_nothing(self, loss):
        term = self._term(loss, reduction="mean_with_sample_weight")
        term._chunk_elements = 4 * 11
        noise = np.random.default_rng(4).normal(size=self.student_logits.shape)
        padded = (1 - self.mask)[..., None] * 50 * noise.astype("float32")

        def loss_of(student, teacher):
            return term.compute_loss(
                teacher, self.labels, student, self.mask, 0, 0
            )

        base = loss_of(self.student_logits, self.teacher_logits)
        moved = loss_of(
            self.student_logits + padded, self.teacher_logits - padded
        )
        np.testing.assert_allclose(moved, base, rtol=1e-6)
        gradient = tiny.gradient(
            lambda s: loss_of(s, self.teacher_logits), self.student_logits
        )
        self.assertTrue(np.all(gradient[self.mask == 0] == 0))
        self.assertTrue(np.all(np.abs(gradient[self.mask == 1]).sum(-1) > 0))

    def test_padding_mask_from_the_inputs(self):
        # No sample_weight: KerasHub-style inputs carry `padding_mask`.
        teacher = ksd.teachers.FrozenModel(self.teacher, input_key="logits")
        term = terms.Distillation(
            teacher, temperature=2.0, reduction="mean_with_sample_weight"
        )
        inputs = {"logits": self.teacher_logits, "padding_mask": self.mask}
        got = term.compute_loss(inputs, None, self.student_logits, None, 0, 0)
        expected = term.compute_loss(
            inputs, None, self.student_logits, self.mask, 0, 0
        )
        everything = term.compute_loss(
            {"logits": self.teacher_logits},
            None,
            self.student_logits,
            None,
            0,
            0,
        )
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        self.assertGreater(abs(float(got) - float(everything)), 1e-3)
        with self.assertRaisesRegex(ValueError, "padding_mask shape"):
            term.compute_loss(
                {"logits": self.teacher_logits, "padding_mask": self.mask[:2]},
                None,
                self.student_logits,
                None,
                0,
                0,
            )

    def test_vocabularies(self):
        wide = np.concatenate(
            [self.teacher_logits, np.full((3, 6, 2), 9.0, "float32")], -1
        )
        logits = keras.Input((6, 13))
        padded = keras.Model(logits, keras.layers.Identity()(logits))
        with self.assertRaisesRegex(ValueError, "same vocabulary.*13.*11"):
            terms.Distillation(padded).compute_loss(
                wide, None, self.student_logits, None, 0, 0
            )
        got = terms.Distillation(padded, vocabulary_size=11).compute_loss(
            wide, None, self.student_logits, None, 0, 0
        )
        expected = terms.Distillation(self.teacher).compute_loss(
            self.teacher_logits, None, self.student_logits, None, 0, 0
        )
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        with self.assertRaisesRegex(ValueError, "vocabulary_size=12.*fewer"):
            terms.Distillation(padded, vocabulary_size=12).compute_loss(
                wide, None, self.student_logits, None, 0, 0
            )
        with self.assertRaisesRegex(ValueError, "vocabulary_size=1"):
            terms.Distillation(padded, vocabulary_size=1)
        with self.assertRaisesRegex(ValueError, "reduction='mean'"):
            terms.Distillation(padded, reduction="mean")

    def test_distiller_accepts_a_padded_teacher_vocabulary(self):
        student = tiny.language_model(vocabulary=11)
        teacher = tiny.language_model(vocabulary=13, seed=1)
        with self.assertRaisesRegex(ValueError, "predicts 13 classes"):
            ksd.Distiller(student, [terms.Distillation(teacher)])
        ksd.Distiller(
            student, [terms.Distillation(teacher, vocabulary_size=11)]
        )

    def test_config(self):
        term = terms.Distillation(
            self.teacher, reduction="mean_with_sample_weight", vocabulary_size=7
        )
        restored = terms.Distillation.from_config(term.get_config())
        self.assertEqual(restored.reduction, "mean_with_sample_weight")
        self.assertEqual(restored.vocabulary_size, 7)

    def test_padded_tokens_change_no_weight_in_fit(self):
        # Two datasets that differ only at padded positions (their tokens
        # and labels) train to the same weights.
        rng = np.random.default_rng(5)
        tokens = rng.integers(0, 11, size=(16, 6)).astype("int32")
        labels = rng.integers(0, 11, size=(16, 6))
        lengths = rng.integers(1, 7, size=(16, 1))
        mask = (np.arange(6) < lengths).astype("float32")
        other_tokens = np.where(mask == 1, tokens, (tokens + 5) % 11)
        other_labels = np.where(mask == 1, labels, (labels + 3) % 11)
        weights = []
        for x, y in ((tokens, labels), (other_tokens, other_labels)):
            term = terms.Distillation(
                tiny.language_model(seed=1),
                loss="jsd",
                temperature=2.0,
                reduction="mean_with_sample_weight",
            )
            term._chunk_elements = 5 * 11
            distiller = ksd.Distiller(tiny.language_model(seed=2), [term])
            distiller.compile(optimizer="adam", loss=tiny.sparse_ce())
            history = distiller.fit(
                x, y, sample_weight=mask, batch_size=4, epochs=2, verbose=0
            ).history
            self.assertTrue(np.isfinite(history["distillation_loss"]).all())
            weights.append(distiller.student.get_weights())
        for a, b in zip(*weights):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
