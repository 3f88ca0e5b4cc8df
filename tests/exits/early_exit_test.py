import keras
import numpy as np
from absl.testing import parameterized

import keras_selfdistill as ksd
from tests import tiny


class EarlyExitTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.student = tiny.cnn()
        self.exits = ksd.exits.attach_exits(self.student, ["b1", "b2"])
        rng = np.random.default_rng(3)
        self.x = rng.normal(size=(200, 6, 6, 1)).astype("float32") * 4.0
        self.outputs = {k: np.asarray(v) for k, v in self.exits(self.x).items()}

    def test_comparing_thresholds_does_not_warn_of_retracing(self):
        with self.assertNoLogs("tensorflow", level="WARNING"):
            for threshold in (0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 1.0):
                ksd.exits.EarlyExit(self.exits, threshold)(self.x)

    @parameterized.parameters(0.2, 0.5, 0.8)
    def test_each_sample_takes_its_first_confident_exit(self, quantile):
        stages = [
            self.outputs["b1"],
            self.outputs["b2"],
            self.outputs["output"],
        ]
        # A threshold inside the first exit's confidences splits the batch.
        threshold = np.quantile(tiny.softmax(stages[0]).max(axis=-1), quantile)
        early = ksd.exits.EarlyExit(self.exits, threshold)
        logits, which = early(self.x)
        confident = [
            tiny.softmax(s).max(axis=-1) >= threshold for s in stages[:2]
        ] + [np.ones(len(self.x), bool)]
        expected = np.argmax(np.stack(confident), axis=0)
        np.testing.assert_array_equal(which, expected)
        self.assertGreater(len(set(which.tolist())), 1)
        # The NumPy path (other backends) agrees with the compiled one.
        eager_logits, eager_which = early._run_eager(self.x)
        np.testing.assert_array_equal(eager_which, which)
        np.testing.assert_allclose(eager_logits, logits, rtol=1e-5, atol=1e-6)
        for index, stage in enumerate(stages):
            rows = which == index
            np.testing.assert_allclose(
                logits[rows], stage[rows], rtol=1e-4, atol=1e-5
            )

    def test_lowest_threshold_answers_at_the_first_exit(self):
        logits, which = ksd.exits.EarlyExit(self.exits, 1e-6)(self.x)
        np.testing.assert_array_equal(which, 0)
        np.testing.assert_allclose(logits, self.outputs["b1"], rtol=1e-5)

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "threshold"):
            ksd.exits.EarlyExit(self.exits, 0.0)
        with self.assertRaisesRegex(ValueError, "threshold"):
            ksd.exits.EarlyExit(self.exits, 1.5)
        with self.assertRaisesRegex(TypeError, "attach_exits"):
            ksd.exits.EarlyExit(self.student)

    def test_skip_connection_across_an_exit_is_refused(self):
        inputs = keras.Input((4,))
        a = keras.layers.Dense(4, name="a")(inputs)
        b = keras.layers.Dense(4, name="b")(a)
        out = keras.layers.Dense(3)(keras.layers.Add()([a, b]))
        student = keras.Model(inputs, out)
        exits = ksd.exits.attach_exits(student, ["b"])
        with self.assertRaisesRegex(ValueError, "skip connection"):
            ksd.exits.EarlyExit(exits)
