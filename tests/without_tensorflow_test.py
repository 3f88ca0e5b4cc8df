"""On JAX the library imports, and trains on NumPy data, without TensorFlow.

The accelerator machines have JAX but no TensorFlow, which is too large to
carry there (`benchmarks/one_step_accelerator.sh`); TensorFlow stays a
declared dependency, and what is built on `tf.data` needs it.
"""

import importlib.util
import os
import subprocess
import sys

from absl.testing import absltest

from tests import tiny

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = """
import sys

# An import of either now fails, as where they are not installed.
sys.modules["tensorflow"] = None
sys.modules["tensorflow_datasets"] = None

import keras
import numpy as np

import keras_selfdistill as ksd

rng = np.random.default_rng(0)
x = rng.normal(size=(32, 4)).astype("float32")
y = rng.integers(0, 3, size=32)
teacher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
distiller = ksd.Distiller(student, [ksd.terms.Distillation(teacher)])
distiller.compile(
    optimizer="sgd",
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
)
history = distiller.fit(x, y, batch_size=8, epochs=2, verbose=0)
print(sorted(history.history), keras.backend.backend())
"""


@tiny.ONCE
@absltest.skipUnless(
    importlib.util.find_spec("jax"), "JAX is not installed (make test-min)"
)
class WithoutTensorFlowTest(absltest.TestCase):
    def test_imports_and_fits_on_jax(self):
        result = subprocess.run(
            [sys.executable, "-c", _SCRIPT],
            capture_output=True,
            text=True,
            cwd=_ROOT,
            env=dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=_ROOT),
            timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("jax", result.stdout)
        self.assertIn("distillation_loss", result.stdout)


if __name__ == "__main__":
    absltest.main()
