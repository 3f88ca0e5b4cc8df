import keras
import numpy as np
from absl.testing import parameterized
from keras import ops

from keras_selfdistill import ops as ksd_ops
from tests import tiny


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax64(z):
    z = np.float64(z) - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _kl(p, q):
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


class KLDivergenceTest(parameterized.TestCase):
    def setUp(self):
        rng = np.random.default_rng(0)
        self.teacher = rng.normal(size=(6, 5)).astype("float32") * 3
        self.student = rng.normal(size=(6, 5)).astype("float32") * 3

    @parameterized.named_parameters(("t1", 1.0), ("t2", 2.0), ("t4", 4.0))
    def test_matches_numpy(self, temperature):
        # T² · Σ_c p_t (log p_t − log p_s), p = softmax(z / T), in float64.
        p = _softmax(self.teacher.astype("float64") / temperature)
        q = _softmax(self.student.astype("float64") / temperature)
        expected = temperature**2 * _kl(p, q)
        got = ksd_ops.kl_divergence(self.teacher, self.student, temperature)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    def test_zero_for_equal_logits(self):
        got = ksd_ops.kl_divergence(self.teacher, self.teacher, 3.0)
        np.testing.assert_allclose(got, np.zeros(6), atol=1e-6)

    def test_invariant_to_row_shift(self):
        shift = np.arange(6, dtype="float32")[:, None] * 7.0
        base = ksd_ops.kl_divergence(self.teacher, self.student, 2.0)
        np.testing.assert_allclose(
            ksd_ops.kl_divergence(self.teacher + shift, self.student, 2.0),
            base,
            rtol=1e-4,
        )
        np.testing.assert_allclose(
            ksd_ops.kl_divergence(self.teacher, self.student - shift, 2.0),
            base,
            rtol=1e-4,
        )

    @parameterized.named_parameters(("t100", 100.0), ("t1e4", 1e4))
    def test_precise_at_large_temperatures(self, temperature):
        # The float64 reference: T² · KL of the tempered softmaxes. Plain
        # float32 log-softmax differences gave 3.68 for 7.34 at T = 1e4.
        rng = np.random.default_rng(4)
        teacher = rng.normal(size=(64, 10)).astype("float32") * 3
        student = rng.normal(size=(64, 10)).astype("float32") * 3
        p = _softmax(teacher.astype("float64") / temperature)
        q = _softmax(student.astype("float64") / temperature)
        for got, expected in (
            (ksd_ops.kl_divergence(teacher, student, temperature), _kl(p, q)),
            (
                ksd_ops.reverse_kl_divergence(teacher, student, temperature),
                _kl(q, p),
            ),
        ):
            np.testing.assert_allclose(
                got, temperature**2 * expected, rtol=5e-3
            )

    def test_never_negative_for_nearly_equal_rows(self):
        # Rounding made about half of these rows slightly negative.
        rng = np.random.default_rng(0)
        teacher = rng.normal(size=(4000, 10)).astype("float32") * 5
        student = (
            teacher + rng.normal(size=teacher.shape).astype("float32") * 1e-6
        )
        for values in (
            ksd_ops.kl_divergence(teacher, student, 1.0),
            ksd_ops.reverse_kl_divergence(teacher, student, 1.0),
            ksd_ops.generalized_jsd(teacher, student, 0.5, 1.0),
        ):
            self.assertGreaterEqual(float(np.min(values)), 0.0)

    def test_float16_inputs_give_finite_float32(self):
        big = self.teacher / np.abs(self.teacher).max() * 1e4
        big = big.astype("float16")
        got = ksd_ops.kl_divergence(big, self.student.astype("float16"), 4.0)
        self.assertEqual(ops.convert_to_numpy(got).dtype, np.float32)
        self.assertTrue(np.all(np.isfinite(ops.convert_to_numpy(got))))


def _tempered_kl64(teacher, student, temperature, reverse):
    """`T² · KL` per row in float64 (`KL(q ‖ p)` when `reverse`)."""
    p = _softmax(teacher / temperature)
    q = _softmax(student / temperature)
    return temperature**2 * (_kl(q, p) if reverse else _kl(p, q))


def _finite_difference(function, x, step=1e-6):
    """The gradient of the scalar `function(x)`, central differences."""
    gradient = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += step
        down[index] -= step
        gradient[index] = (function(up) - function(down)) / (2 * step)
    return gradient


class ClosedFormGradientTest(parameterized.TestCase):
    """`kl_divergence` and `reverse_kl_divergence` differentiate in closed
    form; the reference is float64 central differences of the definition.
    """

    def setUp(self):
        rng = np.random.default_rng(7)
        self.teacher = rng.normal(size=(5, 6)) * 3
        self.student = rng.normal(size=(5, 6)) * 3
        # A different weight per row, as a reduction with sample weights.
        self.upstream = rng.uniform(0.5, 2.0, size=5)

    @parameterized.product(reverse=(False, True), temperature=(1.0, 4.0, 100.0))
    def test_gradients_match_finite_differences(self, reverse, temperature):
        # With respect to both logits and to the temperature (a trainable
        # temperature gets its gradient from the closed form too).
        function = (
            ksd_ops.reverse_kl_divergence if reverse else ksd_ops.kl_divergence
        )
        upstream = self.upstream.astype("float32")
        values = {
            "teacher": self.teacher,
            "student": self.student,
            "temperature": np.array(temperature),
        }
        got = tiny.gradients(
            lambda v: ops.sum(
                upstream
                * function(v["teacher"], v["student"], v["temperature"])
            ),
            {k: v.astype("float32") for k, v in values.items()},
        )
        # ∂L/∂T is O(1/T²) at large T and loses digits in float32, in this
        # closed form as in autodiff (on TensorFlow, 6e-3 and 1.3e-2 off at
        # T = 100 for reverse KL, 0.2 for both at T = 1000): checked at 1
        # and 4 only.
        names = list(values) if temperature < 10 else ["teacher", "student"]
        for name in names:

            def weighted(x, name=name):
                arguments = dict(values, **{name: x})
                per_row = _tempered_kl64(
                    arguments["teacher"],
                    arguments["student"],
                    arguments["temperature"],
                    reverse,
                )
                return np.sum(self.upstream * per_row)

            expected = _finite_difference(weighted, values[name])
            scale = np.abs(expected).max()
            np.testing.assert_allclose(
                got[name], expected, rtol=1e-3, atol=1e-4 * scale, err_msg=name
            )

    @parameterized.product(reverse=(False, True), temperature=(1.0, 4.0))
    def test_log_probability_targets_match_finite_differences(
        self, reverse, temperature
    ):
        # Targets of kind "log_probs" are the target's log-probabilities at
        # T (renormalised, never divided by T): L = T² · KL(softmax(a) ‖
        # softmax(s / T)), differentiated in a, s and T.
        function = (
            ksd_ops.reverse_kl_divergence if reverse else ksd_ops.kl_divergence
        )
        upstream = self.upstream.astype("float32")
        values = {
            "teacher": self.teacher / 3.0,
            "student": self.student,
            "temperature": np.array(temperature),
        }
        got = tiny.gradients(
            lambda v: ops.sum(
                upstream
                * function(
                    v["teacher"],
                    v["student"],
                    v["temperature"],
                    teacher_kind="log_probs",
                )
            ),
            {k: v.astype("float32") for k, v in values.items()},
        )
        for name in values:

            def weighted(x, name=name):
                arguments = dict(values, **{name: x})
                t = arguments["temperature"]
                per_row = _tempered_kl64(
                    t * arguments["teacher"], arguments["student"], t, reverse
                )
                return np.sum(self.upstream * per_row)

            expected = _finite_difference(weighted, values[name])
            scale = np.abs(expected).max()
            np.testing.assert_allclose(
                got[name], expected, rtol=1e-3, atol=1e-4 * scale, err_msg=name
            )

    @parameterized.parameters("kl", "reverse_kl", "jsd", "dkd")
    def test_log_probability_targets_equal_their_logits(self, loss):
        # log_softmax(t / T) read as "log_probs" is the same target as t
        # read as logits, for every divergence.
        temperature = 3.0
        teacher = self.teacher.astype("float32")
        student = self.student.astype("float32")
        log_p = _log_softmax64(self.teacher / temperature).astype("float32")
        target = np.eye(6, dtype="float32")[[0, 2, 5, 1, 1]]

        def value(t, kind):
            if loss == "dkd":
                return ksd_ops.decoupled_kl(
                    t, student, target, 8.0, temperature, teacher_kind=kind
                )
            if loss == "jsd":
                return ksd_ops.generalized_jsd(
                    t, student, 0.3, temperature, teacher_kind=kind
                )
            function = getattr(ksd_ops, f"{loss}_divergence")
            return function(t, student, temperature, teacher_kind=kind)

        np.testing.assert_allclose(
            np.asarray(value(log_p, "log_probs")),
            np.asarray(value(teacher, "logits")),
            rtol=1e-5,
            atol=1e-6,
        )
        with self.assertRaisesRegex(ValueError, "kind must be one of"):
            value(teacher, "probabilities")

    def test_second_derivative_matches_finite_differences(self):
        # The gradient of Σ (∂L/∂s)², L = Σ T²·KL(p ‖ q): it differentiates
        # the closed form itself.
        temperature = 2.0
        teacher = self.teacher.astype("float32")
        student = self.student.astype("float32")

        def loss(s):
            return ops.sum(ksd_ops.kl_divergence(teacher, s, temperature))

        if keras.backend.backend() == "jax":
            import jax

            got = jax.grad(lambda s: ops.sum(ops.square(jax.grad(loss)(s))))(
                student
            )
        else:
            import tensorflow as tf

            s = tf.constant(student)
            with tf.GradientTape() as outer:
                outer.watch(s)
                with tf.GradientTape() as inner:
                    inner.watch(s)
                    value = loss(s)
                total = ops.sum(ops.square(inner.gradient(value, s)))
            got = outer.gradient(total, s)
        p = _softmax(self.teacher / temperature)

        def reference(s):
            q = _softmax(s / temperature)
            return np.sum((temperature * (q - p)) ** 2)

        np.testing.assert_allclose(
            np.asarray(got),
            _finite_difference(reference, self.student),
            atol=1e-4,
        )

    def test_backward_pass_does_not_branch(self):
        # The precise branch for large temperatures is a `cond` in the
        # forward pass; differentiating through it would add a second one
        # (and keep its intermediates) in the backward pass.
        if keras.backend.backend() != "tensorflow":
            self.skipTest("Counts TensorFlow graph operations.")
        import tensorflow as tf

        temperature = tf.Variable(4.0)
        teacher = tf.constant(self.teacher.astype("float32"))

        @tf.function
        def gradient(student):
            with tf.GradientTape() as tape:
                tape.watch(student)
                value = ops.sum(
                    ksd_ops.kl_divergence(teacher, student, temperature)
                )
            return tape.gradient(value, student)

        graph = gradient.get_concrete_function(
            tf.TensorSpec((None, 6), "float32")
        ).graph.as_graph_def()
        nodes = list(graph.node) + [
            n for f in graph.library.function for n in f.node_def
        ]
        branches = [n.op for n in nodes if n.op in ("If", "StatelessIf")]
        self.assertEqual(branches, ["StatelessIf"])


class ReverseKLDivergenceTest(parameterized.TestCase):
    def test_matches_numpy(self):
        rng = np.random.default_rng(1)
        t, s = rng.normal(size=(2, 4, 7)).astype("float32")
        # T² · Σ_c p_s (log p_s − log p_t) with T = 2.
        expected = 4.0 * _kl(_softmax(s / 2.0), _softmax(t / 2.0))
        got = ksd_ops.reverse_kl_divergence(t, s, 2.0)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


class GeneralizedJSDTest(parameterized.TestCase):
    def setUp(self):
        rng = np.random.default_rng(2)
        self.t, self.s = rng.normal(size=(2, 5, 4)).astype("float32") * 2

    def test_matches_numpy(self):
        # M = β P + (1 − β) Q;  β KL(P‖M) + (1 − β) KL(Q‖M), times T².
        beta, temperature = 0.3, 2.0
        p = _softmax(self.t / temperature)
        q = _softmax(self.s / temperature)
        m = beta * p + (1 - beta) * q
        expected = temperature**2 * (beta * _kl(p, m) + (1 - beta) * _kl(q, m))
        got = ksd_ops.generalized_jsd(self.t, self.s, beta, temperature)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    def test_end_points_are_forward_and_reverse_kl(self):
        np.testing.assert_allclose(
            ksd_ops.generalized_jsd(self.t, self.s, 0.0),
            ksd_ops.kl_divergence(self.t, self.s),
        )
        np.testing.assert_allclose(
            ksd_ops.generalized_jsd(self.t, self.s, 1.0),
            ksd_ops.reverse_kl_divergence(self.t, self.s),
        )

    def test_scaled_limits_approach_kl(self):
        # JSD(β)/β → KL(P‖Q) as β → 0 and JSD(β)/(1−β) → KL(Q‖P) as β → 1.
        eps = 1e-4
        np.testing.assert_allclose(
            ksd_ops.generalized_jsd(self.t, self.s, eps) / eps,
            ksd_ops.kl_divergence(self.t, self.s),
            rtol=5e-3,
        )
        np.testing.assert_allclose(
            ksd_ops.generalized_jsd(self.t, self.s, 1 - eps) / eps,
            ksd_ops.reverse_kl_divergence(self.t, self.s),
            rtol=5e-3,
        )

    def test_rejects_beta_outside_unit_interval(self):
        with self.assertRaisesRegex(ValueError, r"beta=1.5"):
            ksd_ops.generalized_jsd(self.t, self.s, 1.5)


class LogitsMSETest(parameterized.TestCase):
    def test_matches_numpy(self):
        t = np.array([[1.0, 2.0, 3.0]], "float32")
        s = np.array([[0.0, 2.0, 5.0]], "float32")
        # ((1 − 0)² + 0² + (3 − 5)²) / 3 = 5 / 3.
        np.testing.assert_allclose(
            ksd_ops.logits_mse(t, s), [5.0 / 3.0], rtol=1e-6
        )


def _dkd(teacher, student, labels, beta, temperature):
    # DKD written from its definition in float64: binary target/other
    # distributions for TCKD, the renormalised non-target ones for NCKD.
    p = _softmax(teacher.astype("float64") / temperature)
    q = _softmax(student.astype("float64") / temperature)
    rows = np.arange(len(labels))
    pt, qt = p[rows, labels], q[rows, labels]
    tckd = pt * np.log(pt / qt) + (1 - pt) * np.log((1 - pt) / (1 - qt))
    other = np.ones_like(p, bool)
    other[rows, labels] = False
    p_hat = np.where(other, p, 1) / (1 - pt)[:, None]
    q_hat = np.where(other, q, 1) / (1 - qt)[:, None]
    nckd = np.sum(np.where(other, p_hat * np.log(p_hat / q_hat), 0), -1)
    return temperature**2 * (tckd + beta * nckd)


class DecoupledKLTest(parameterized.TestCase):
    def setUp(self):
        rng = np.random.default_rng(3)
        self.teacher = rng.normal(size=(6, 5)).astype("float32") * 3
        self.student = rng.normal(size=(6, 5)).astype("float32") * 3
        self.labels = np.array([0, 1, 2, 3, 4, 1])
        self.target = np.eye(5, dtype="float32")[self.labels]

    @parameterized.named_parameters(("t1", 1.0, 8.0), ("t4", 4.0, 0.5))
    def test_matches_numpy(self, temperature, beta):
        expected = _dkd(
            self.teacher, self.student, self.labels, beta, temperature
        )
        got = ksd_ops.decoupled_kl(
            self.teacher, self.student, self.target, beta, temperature
        )
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)

    def test_tckd_plus_nckd_weighted_by_target_mass_is_kl(self):
        # The paper's identity KD = TCKD + (1 − p_t^teacher) · NCKD.
        p = _softmax(self.teacher.astype("float64"))
        rows = np.arange(6)
        tckd = ksd_ops.decoupled_kl(self.teacher, self.student, self.target, 0)
        full = ksd_ops.decoupled_kl(self.teacher, self.student, self.target, 1)
        nckd = np.asarray(full) - np.asarray(tckd)
        np.testing.assert_allclose(
            np.asarray(tckd) + (1 - p[rows, self.labels]) * nckd,
            ksd_ops.kl_divergence(self.teacher, self.student),
            rtol=1e-4,
        )

    def test_two_classes_is_kd_without_a_division_by_zero(self):
        teacher, student = self.teacher[:, :2], self.student[:, :2]
        target = np.eye(2, dtype="float32")[self.labels % 2]
        got = ksd_ops.decoupled_kl(teacher, student, target, 8.0, 2.0)
        np.testing.assert_allclose(
            got, ksd_ops.kl_divergence(teacher, student, 2.0), rtol=1e-5
        )

    def test_zero_at_equality_and_invariant_to_row_shift(self):
        same = ksd_ops.decoupled_kl(self.teacher, self.teacher, self.target, 8)
        np.testing.assert_allclose(same, np.zeros(6), atol=1e-5)
        shift = np.arange(6, dtype="float32")[:, None] * 5.0
        np.testing.assert_allclose(
            ksd_ops.decoupled_kl(
                self.teacher + shift, self.student - shift, self.target, 8.0
            ),
            ksd_ops.decoupled_kl(self.teacher, self.student, self.target, 8),
            rtol=1e-4,
        )

    def test_finite_for_a_teacher_certain_of_the_target(self):
        teacher = self.teacher.copy()
        teacher[np.arange(6), self.labels] = 200.0
        got = ksd_ops.decoupled_kl(teacher, self.student, self.target, 8.0)
        self.assertTrue(np.all(np.isfinite(got)))


class StandardizeLogitsTest(parameterized.TestCase):
    def test_matches_numpy_and_is_invariant_to_scale_and_shift(self):
        logits = np.random.default_rng(5).normal(size=(4, 7)).astype("f4")
        x = logits.astype("float64")
        # Unbiased standard deviation (ddof=1) plus 1e-7, as torch.std.
        expected = (x - x.mean(-1, keepdims=True)) / (
            x.std(-1, ddof=1, keepdims=True) + 1e-7
        )
        got = ksd_ops.standardize_logits(logits)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            ksd_ops.standardize_logits(3.0 * logits - 11.0), got, atol=1e-5
        )

    def test_constant_row_has_a_finite_gradient(self):
        if keras.backend.backend() != "tensorflow":
            self.skipTest("The gradient tape is TensorFlow's.")
        import tensorflow as tf

        logits = tf.zeros((2, 4))
        with tf.GradientTape() as tape:
            tape.watch(logits)
            value = ops.sum(ksd_ops.standardize_logits(logits) * [1, 2, 3, 4])
        self.assertTrue(np.all(np.isfinite(tape.gradient(value, logits))))


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _top_k(log_p, k):
    ids = np.argsort(-log_p, axis=-1)[..., :k]
    top = np.take_along_axis(log_p, ids, -1)
    rest = np.log(np.maximum(1.0 - np.exp(top).sum(-1), 1e-300))
    return ids, top, rest


class TopKDivergenceTest(parameterized.TestCase):
    def setUp(self):
        rng = np.random.default_rng(1)
        self.teacher = rng.normal(size=(2, 3, 7)) * 2
        self.student = rng.normal(size=(2, 3, 7)).astype("float32") * 2

    def _targets(self, k, temperature):
        return _top_k(_log_softmax(self.teacher / temperature), k)

    @parameterized.product(
        loss=("kl", "reverse_kl", "jsd"), temperature=(1.0, 3.0)
    )
    def test_matches_numpy_on_k_plus_one_classes(self, loss, temperature):
        # The teacher's k classes and its rest; the student folded the same
        # way: its probabilities of those classes and the rest of its mass.
        ids, top, rest = self._targets(3, temperature)
        p = np.exp(np.concatenate([top, rest[..., None]], -1))
        q_all = np.exp(_log_softmax(self.student / temperature))
        q_top = np.take_along_axis(q_all, ids, -1)
        q = np.concatenate([q_top, 1 - q_top.sum(-1, keepdims=True)], -1)
        m = 0.3 * p + 0.7 * q
        expected = (
            temperature**2
            * {
                "kl": _kl(p, q),
                "reverse_kl": _kl(q, p),
                "jsd": 0.3 * _kl(p, m) + 0.7 * _kl(q, m),
            }[loss]
        )
        got = ksd_ops.top_k_divergence(
            ids, top, rest, self.student, loss, 0.3, temperature
        )
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)

    @parameterized.named_parameters(
        ("kl", "kl", ksd_ops.kl_divergence),
        ("reverse_kl", "reverse_kl", ksd_ops.reverse_kl_divergence),
    )
    def test_every_class_kept_is_the_dense_divergence(self, loss, dense):
        ids, top, rest = self._targets(7, 2.0)
        got = ksd_ops.top_k_divergence(
            ids, top, rest, self.student, loss, temperature=2.0
        )
        expected = dense(self.teacher.astype("float32"), self.student, 2.0)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)

    def test_targets_are_renormalised_with_the_rest_as_a_class(self):
        # Stored values are rounded: a shift of every stored log-probability
        # changes nothing, and a student equal to the teacher scores 0. The
        # recipe that renormalises the k probabilities without the rest (the
        # bias RS-KD describes) scores a student equal to the teacher > 0.
        ids, top, rest = self._targets(3, 1.0)
        student = self.teacher.astype("float32")
        exact = ksd_ops.top_k_divergence(ids, top, rest, self.student)
        shifted = ksd_ops.top_k_divergence(
            ids, top + 0.01, rest + 0.01, self.student
        )
        np.testing.assert_allclose(shifted, exact, rtol=1e-5)
        np.testing.assert_allclose(
            ksd_ops.top_k_divergence(ids, top, rest, student),
            np.zeros((2, 3)),
            atol=1e-5,
        )
        renormalised = top - np.log(np.exp(top).sum(-1, keepdims=True))
        q = np.take_along_axis(_log_softmax(self.teacher), ids, -1)
        self.assertTrue(
            np.all((np.exp(renormalised) * (renormalised - q)).sum(-1) > 0.01)
        )

    def test_rejects_losses_that_need_every_class(self):
        ids, top, rest = self._targets(3, 1.0)
        with self.assertRaisesRegex(ValueError, "loss='mse'"):
            ksd_ops.top_k_divergence(ids, top, rest, self.student, "mse")


class SampledKLDivergenceTest(parameterized.TestCase):
    def setUp(self):
        rng = np.random.default_rng(2)
        self.log_p = _log_softmax(rng.normal(size=(4, 6)) * 2)
        self.student = rng.normal(size=(4, 6)).astype("float32")

    def _draw(self, rng, draws):
        p = np.exp(self.log_p)
        counts = np.stack([rng.multinomial(draws, row) for row in p])
        ids = np.argsort(-counts, -1)
        weights = np.take_along_axis(counts, ids, -1) / draws
        return ids, weights, np.take_along_axis(self.log_p, ids, -1)

    def test_matches_numpy_and_renormalises_the_weights(self):
        ids, weights, log_p = self._draw(np.random.default_rng(0), 7)
        log_q = np.take_along_axis(_log_softmax(self.student / 2.0), ids, -1)
        expected = 4.0 * (weights * (log_p - log_q)).sum(-1)
        for scale in (1.0, 1.03):
            got = ksd_ops.sampled_kl_divergence(
                ids, weights * scale, log_p, self.student, 2.0
            )
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    def test_unbiased_for_the_dense_value_and_gradient(self):
        # The mean of 2,000 estimates from 8 draws each is within 4
        # standard errors of the dense KL and of its gradient.
        rng = np.random.default_rng(3)
        dense = np.asarray(ksd_ops.kl_divergence(self.log_p, self.student))
        dense_gradient = tiny.gradient(
            lambda s: ops.sum(ksd_ops.kl_divergence(self.log_p, s)),
            self.student,
        )
        draws = [self._draw(rng, 8) for _ in range(2000)]
        ids, weights, log_p = (np.stack(a) for a in zip(*draws))
        # All 2,000 estimates in one call: a leading axis of draws.
        students = np.broadcast_to(self.student, (2000,) + self.student.shape)
        values = ksd_ops.sampled_kl_divergence(ids, weights, log_p, students)
        gradients = [
            np.exp(_log_softmax(self.student.astype("float64")))
            - _scatter(*draw[:2])
            for draw in draws
        ]
        for estimates, target in (
            (np.asarray(values), dense),
            (np.asarray(gradients), dense_gradient),
        ):
            error = estimates.std(0) / np.sqrt(len(estimates)) + 1e-9
            self.assertLess(
                np.max(np.abs(estimates.mean(0) - target) / error), 4
            )
        # The op's own gradient is q − w for one estimate.
        ids, weights, log_p = self._draw(rng, 8)
        got = tiny.gradient(
            lambda s: ops.sum(
                ksd_ops.sampled_kl_divergence(ids, weights, log_p, s)
            ),
            self.student,
        )
        np.testing.assert_allclose(
            got,
            np.exp(_log_softmax(self.student.astype("float64")))
            - _scatter(ids, weights),
            atol=1e-5,
        )


def _scatter(ids, weights):
    dense = np.zeros((ids.shape[0], 6))
    np.add.at(dense, (np.arange(ids.shape[0])[:, None], ids), weights)
    return dense
