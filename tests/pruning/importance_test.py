import keras
import numpy as np
from absl.testing import absltest

import keras_selfdistill as ksd
from tests import tiny
from tests.pruning.structured_test import images
from tests.pruning.structured_test import residual_cnn
from tests.pruning.structured_test import weights


class MagnitudeTest(absltest.TestCase):
    def test_l1_norms_summed_over_a_residual_group(self):
        model = residual_cnn()
        scores = ksd.pruning.magnitude(model)
        self.assertEqual(list(scores), ["c1", "c3", "fc"])
        c1, c2 = weights(model, "c1")[0], weights(model, "c2")[0]
        expected = np.abs(c1).sum(axis=(0, 1, 2)) + np.abs(c2).sum(
            axis=(0, 1, 2)
        )
        np.testing.assert_allclose(scores["c1"], expected, rtol=1e-6)
        np.testing.assert_allclose(
            scores["fc"], np.abs(weights(model, "fc")[0]).sum(axis=0), rtol=1e-6
        )


class ActivationTest(absltest.TestCase):
    def test_mean_absolute_activation_where_it_is_read(self):
        model, (x, _) = tiny.mlp(hidden=6), tiny.data(n=10)
        kernel, bias = weights(model, model.layers[0].name)
        hidden = np.maximum(np.float64(x) @ kernel + bias, 0.0)
        scores = ksd.pruning.activation(model, x, batch_size=3)
        np.testing.assert_allclose(
            scores[model.layers[0].name], np.abs(hidden).mean(axis=0), rtol=1e-5
        )

    def test_summed_over_readers_and_averaged_over_positions(self):
        # {c1, c2} is read by c2 (the ReLU's output), by c3 (the pooled
        # sum) and, through the concatenation, by fc (the depthwise
        # output at channels 0-3 of each of 9 positions).
        model, x = residual_cnn(), images(n=4)
        probe = keras.Model(
            model.input,
            [model.get_layer(n).output for n in ("relu", "pool", "dw")],
        )
        relu, pool, dw = (np.abs(np.float64(v)) for v in probe(x))
        expected = (
            relu.mean(axis=(0, 1, 2))
            + pool.mean(axis=(0, 1, 2))
            + dw.mean(axis=(0, 1, 2))[:4]
        )
        scores = ksd.pruning.activation(model, x, batch_size=3)
        np.testing.assert_allclose(scores["c1"], expected, rtol=1e-5)
        np.testing.assert_allclose(
            scores["c3"], dw.mean(axis=(0, 1, 2))[4:], rtol=1e-5
        )

    def test_bad_calibration_inputs(self):
        with self.assertRaisesRegex(ValueError, "at least one calibration"):
            ksd.pruning.activation(tiny.mlp(), np.zeros((0, 4), "float32"))
        with self.assertRaisesRegex(TypeError, "as arrays"):
            ksd.pruning.activation(tiny.mlp(), "x")
