"""Private Keras, TensorFlow and JAX APIs are used in `_internals` only."""

import pathlib
import re
import sys

from absl.testing import parameterized

from tests import tiny
from tests import watchdog

ROOT = pathlib.Path(__file__).resolve().parents[1] / "keras_selfdistill"
ALLOWED = ROOT / "_internals.py"
PRIVATE = re.compile(
    r"keras\.src|tensorflow\.python|jax\._src|jax\.core|_keras_history"
    r"|\._compile_loss|\._direction|_jax_state|jax_state_sync"
    r"|_build_cache"
)


def _uses(path):
    return [
        f"{path.name}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line) and not line.lstrip().startswith("#")
    ]


class InternalsTest(parameterized.TestCase):
    def test_private_apis_only_in_internals(self):
        found = [
            use
            for path in sorted(ROOT.rglob("*.py"))
            if path != ALLOWED
            for use in _uses(path)
        ]
        self.assertEqual(found, [])

    def test_the_scan_catches_each_pattern(self):
        sample = pathlib.Path(self.create_tempdir().full_path) / "bad.py"
        sample.write_text(
            "from keras.src.trainers import compile_utils\n"
            "from tensorflow.python.data import ops\n"
            "layer = tensor._keras_history.operation\n"
            "model._compile_loss(y, y_pred)\n"
            "isinstance(x, jax.core.Tracer)\n"
        )
        self.assertLen(_uses(sample), 5)
        self.assertNotEmpty(_uses(ALLOWED))

    @tiny.ONCE
    def test_package_imports_without_private_keras(self):
        # A Keras release without the private module: the import still
        # works (in a fresh process, so the registry here is untouched).
        code = (
            "import sys, keras; "
            "sys.modules['keras.src.trainers.compile_utils'] = None; "
            "import keras_selfdistill as k; print(k.Distiller)"
        )
        result = watchdog.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn("Distiller", result.stdout)
