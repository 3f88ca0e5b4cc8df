"""Every Python block of the README runs as written, in order.

The blocks run in one fresh interpreter, in a temporary folder, after the
preamble below: the only changes are the data's size (the first 64
training and 32 test digits; tiny Fashion-MNIST files for the
tensorflow-datasets builder) and a multi-host `initialize` that records
its arguments instead of connecting.
"""

import os
import re
import subprocess
import sys

import pytest
from absl.testing import absltest

from tests import tiny

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PREAMBLE = """
import os
import sys

import keras

import keras_selfdistill as ksd
from keras_selfdistill.datasets import fashion_mnist
from tests.datasets.fashion_mnist_test import fake_fashion_mnist

_load_mnist = ksd.datasets.load_mnist


def _first_digits(*args, **kwargs):
    (x, y), (x_test, y_test) = _load_mnist(*args, **kwargs)
    return (x[:64], y[:64]), (x_test[:32], y_test[:32])


ksd.datasets.load_mnist = _first_digits
os.makedirs("fashion", exist_ok=True)
fake_fashion_mnist("fashion")
fashion_mnist.DEFAULT_PATH = os.path.abspath("fashion")
os.environ["RANK"] = "0"
_initialized = []
keras.distribution.initialize = lambda **kwargs: _initialized.append(kwargs)
keras.distribution.set_distribution = lambda distribution: None
"""


def blocks(text):
    """`(line, code)` of each ```python block, indentation removed."""
    found = []
    for match in re.finditer(r"^( *)```python\n(.*?)^\1```", text, re.S | re.M):
        indent = len(match.group(1))
        code = "\n".join(line[indent:] for line in match.group(2).splitlines())
        found.append((text[: match.start()].count("\n") + 1, code))
    return found


class BlocksTest(absltest.TestCase):
    def test_finds_every_block(self):
        with open(os.path.join(_ROOT, "README.md")) as file:
            text = file.read()
        self.assertLen(blocks(text), text.count("```python"))
        self.assertGreaterEqual(len(blocks(text)), 16)


# The README's blocks train (tiny) models for minutes: the slow tier, once.
@tiny.ONCE
@pytest.mark.slow
class ReadmeTest(absltest.TestCase):
    def test_every_python_block_runs_in_order(self):
        with open(os.path.join(_ROOT, "README.md")) as file:
            found = blocks(file.read())
        script = [_PREAMBLE]
        for line, code in found:
            script.append(f"print('README.md:{line}', flush=True)\n{code}\n")
        script.append("assert _initialized, 'the multi-host block ran'\n")
        folder = self.create_tempdir().full_path
        environment = dict(
            os.environ,
            PYTHONPATH=_ROOT,
            TF_CPP_MIN_LOG_LEVEL="3",
            TFDS_DATA_DIR=os.path.join(folder, "tfds"),
        )
        result = subprocess.run(
            [sys.executable, "-c", "\n".join(script)],
            cwd=folder,
            env=environment,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        reached = re.findall(r"README\.md:\d+", result.stdout)
        self.assertEqual(
            result.returncode,
            0,
            f"failed in the block after {reached[-1:] or 'the preamble'}:\n"
            + result.stderr[-3000:],
        )
        self.assertLen(reached, len(found))
