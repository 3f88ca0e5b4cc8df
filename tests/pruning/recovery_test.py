import keras
import numpy as np
from absl.testing import absltest

import keras_selfdistill as ksd
from keras_selfdistill import _internals
from tests import tiny
from tests.pruning.structured_test import images
from tests.pruning.structured_test import residual_cnn


@tiny.ONCE
class RecoveryTest(absltest.TestCase):
    def test_a_pruned_model_distils_from_its_original(self):
        # Minitron's recovery: the pruned model learns the original's logits
        # and, through a projector (its `fc` has 3 units of 5 left), the
        # original's features at the layer of the same name.
        original, x = residual_cnn(), images(n=16)
        y = np.argmax(_internals.to_numpy(original(x)), axis=-1)
        before = [_internals.to_numpy(w) for w in original.weights]
        scores = ksd.pruning.activation(original, x)
        student = ksd.pruning.prune(original, 0.5, scores=scores)
        self.assertEqual(student.get_layer("fc").units, 3)
        initial = tiny.kd(original(x), student(x), 2.0).mean()
        distiller = ksd.Distiller(
            student,
            [
                ksd.terms.Distillation(original, temperature=2.0),
                ksd.terms.FeatureDistillation(original, "fc"),
            ],
        )
        distiller.compile(
            optimizer=keras.optimizers.Adam(0.01), loss=tiny.sparse_ce()
        )
        history = distiller.fit(x, y, batch_size=8, epochs=8, verbose=0)
        gap = tiny.kd(original(x), student(x), 2.0).mean()
        self.assertLess(gap, 0.5 * initial)
        self.assertIn("feature_distillation_loss", history.history)
        for old, now in zip(before, original.weights):
            np.testing.assert_array_equal(_internals.to_numpy(now), old)
