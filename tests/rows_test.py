import keras
import numpy as np
from absl.testing import parameterized

from keras_selfdistill import _rows
from keras_selfdistill import ops as ksd_ops

_LOSSES = {
    "kl": ksd_ops.kl_divergence,
    "reverse_kl": ksd_ops.reverse_kl_divergence,
    "jsd": lambda t, s, temperature: ksd_ops.generalized_jsd(
        t, s, 0.3, temperature
    ),
    "mse": lambda t, s, temperature: ksd_ops.logits_mse(t, s),
    "dkd": lambda t, s, labels, temperature: ksd_ops.decoupled_kl(
        t, s, keras.ops.one_hot(labels, s.shape[-1]), 2.0, temperature
    ),
}


def _value_and_gradient(function, student, upstream, compiled, dynamic):
    """`function(student)`, and the gradient of `Σ upstream · value`."""
    if keras.backend.backend() == "jax":
        import jax

        def weighted(s):
            values = function(s)
            return (values * upstream).sum(), values

        step = jax.value_and_grad(weighted, has_aux=True)
        if compiled:
            step = jax.jit(step)
        (_, values), gradient = step(student)
        return np.asarray(values), np.asarray(gradient)
    import tensorflow as tf

    def step(s):
        with tf.GradientTape() as tape:
            tape.watch(s)
            values = function(s)
            total = tf.reduce_sum(values * upstream)
        return values, tape.gradient(total, s)

    if compiled:
        signature = None
        if dynamic:
            shape = [None] * (len(student.shape) - 1) + [student.shape[-1]]
            signature = [tf.TensorSpec(shape, student.dtype)]
        step = tf.function(
            step, input_signature=signature, jit_compile=compiled == "xla"
        )
    values, gradient = step(tf.constant(student))
    return values.numpy(), gradient.numpy()


class PerRowTest(parameterized.TestCase):
    def setUp(self):
        rng = np.random.default_rng(0)
        # 3 × 7 = 21 rows, 5 per chunk: a ragged last chunk (an overlapping
        # one on JAX).
        self.teacher = rng.normal(size=(3, 7, 11)).astype("float32") * 2
        self.student = rng.normal(size=(3, 7, 11)).astype("float32") * 2
        self.labels = rng.integers(0, 11, size=(3, 7)).astype("int32")
        self.upstream = rng.uniform(size=(3, 7)).astype("float32")

    def _both(self, loss, compiled, dynamic=False, dtype="float32"):
        function = _LOSSES[loss]
        rows = (self.labels,) if loss == "dkd" else ()
        teacher = keras.ops.convert_to_tensor(self.teacher)
        student = self.student.astype(dtype)
        results = []
        for chunk_elements in (55, _rows.CHUNK_ELEMENTS):
            results.append(
                _value_and_gradient(
                    lambda s, c=chunk_elements: _rows.per_row(
                        function,
                        teacher,
                        s,
                        rows=rows,
                        scalars=(2.0,),
                        chunk_elements=c,
                    ),
                    student,
                    self.upstream,
                    compiled,
                    dynamic,
                )
            )
        return results

    @parameterized.product(
        loss=sorted(_LOSSES), compiled=[False, True], dynamic=[False, True]
    )
    def test_chunks_equal_one_piece(self, loss, compiled, dynamic):
        # The same values and the same gradient with respect to the
        # student, whether the 21 rows are taken 5 at a time or at once;
        # the one-piece gradient is the backend's own autodiff.
        if dynamic and (not compiled or keras.backend.backend() == "jax"):
            self.skipTest("unknown row counts exist only in traced TF")
        (values, gradient), (expected, expected_gradient) = self._both(
            loss, compiled, dynamic
        )
        self.assertEqual(values.shape, (3, 7))
        np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            gradient, expected_gradient, rtol=1e-5, atol=1e-7
        )
        self.assertGreater(np.abs(gradient).min(), 0.0)

    def test_under_xla(self):
        if keras.backend.backend() != "tensorflow":
            self.skipTest("JAX always compiles with XLA (covered above)")
        (values, gradient), (expected, expected_gradient) = self._both(
            "jsd", "xla", dynamic=False
        )
        np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            gradient, expected_gradient, rtol=1e-5, atol=1e-7
        )

    @parameterized.named_parameters(
        ("float16", "float16"), ("float64", "float64")
    )
    def test_gradient_in_the_student_dtype(self, dtype):
        if keras.ops.convert_to_tensor(np.float64(1)).dtype != "float64":
            self.skipTest("float64 is off on JAX (jax_enable_x64)")
        (values, gradient), (expected, expected_gradient) = self._both(
            "kl", True, dtype=dtype
        )
        self.assertEqual(values.dtype, np.float32)
        self.assertEqual(gradient.dtype, np.dtype(dtype))
        np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            gradient, expected_gradient, rtol=2.5e-3, atol=1e-6
        )

    def test_small_outputs_in_one_piece(self):
        # 21 rows fit one chunk of the default size: no loop at all.
        self.assertEqual(_rows.chunk_rows(11), _rows.CHUNK_ELEMENTS // 11)
        self.assertEqual(_rows.chunk_rows(1 << 30), 1)
