"""Every Python block of the documentation runs as written.

The README's blocks run in order in a namespace of their own. The guide's
pages (docs/, in the order of mkdocs.yml's navigation) run next: the first
page, whose first block is the setup the others name, in one namespace,
and every later page in a copy of it, so that a page uses no name another
page defined. All of it in one fresh interpreter, in a temporary folder,
after the preamble below: the only changes are the data's size (the first
64 training and 32 test digits; tiny Fashion-MNIST files for the
tensorflow-datasets builder) and a multi-host `initialize` that records
its arguments instead of connecting.
"""

import ast
import importlib
import inspect
import os
import pkgutil
import re
import sys

import pytest
from absl.testing import absltest

import keras_selfdistill
from tests import tiny
from tests import watchdog

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


def guide_pages():
    """The pages of mkdocs.yml's navigation, in its order."""
    with open(os.path.join(_ROOT, "mkdocs.yml")) as file:
        text = file.read()
    navigation = text[text.index("\nnav:") :]
    return re.findall(r"^\s+- (?:[^:\n]+: )?([\w/.-]+\.md)$", navigation, re.M)


def read(path):
    with open(os.path.join(_ROOT, path)) as file:
        return file.read()


def docstring_examples():
    """`(object name, code)` of each python block in public docstrings."""
    found = []
    modules = [keras_selfdistill] + [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(
            keras_selfdistill.__path__, "keras_selfdistill."
        )
        if not any(part.startswith("_") for part in info.name.split("."))
    ]
    for module in modules:
        objects = [(module.__name__, module)]
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != (
                module.__name__
            ):
                continue
            objects.append((f"{module.__name__}.{name}", value))
            if inspect.isclass(value):
                objects.extend(
                    (f"{module.__name__}.{name}.{member}", attribute)
                    for member, attribute in vars(value).items()
                    if not member.startswith("_")
                )
        for name, value in objects:
            docstring = (
                inspect.getdoc(value)
                if callable(value) or (inspect.ismodule(value))
                else None
            )
            for _, code in blocks(docstring or ""):
                found.append((name, code))
    return found


class BlocksTest(absltest.TestCase):
    def test_finds_every_block(self):
        for path in ["README.md"] + [f"docs/{page}" for page in guide_pages()]:
            text = read(path)
            self.assertLen(blocks(text), text.count("```python"), path)
        self.assertGreaterEqual(len(blocks(read("README.md"))), 1)
        self.assertGreaterEqual(len(blocks(read("docs/distiller.md"))), 2)

    def test_navigation_lists_every_page(self):
        pages = guide_pages()
        on_disk = sorted(
            os.path.relpath(
                os.path.join(folder, name), os.path.join(_ROOT, "docs")
            )
            for folder, _, names in os.walk(os.path.join(_ROOT, "docs"))
            for name in names
            if name.endswith(".md")
        )
        self.assertEqual(sorted(pages), on_disk)
        self.assertLen(set(pages), len(pages))
        self.assertEqual(pages[:2], ["index.md", "distiller.md"])

    def test_docstring_examples_parse(self):
        found = docstring_examples()
        self.assertGreaterEqual(len(found), 40)
        for name, code in found:
            with self.subTest(name):
                ast.parse(code, filename=name)


def _page_script(path, namespace):
    """Lines that run a file's blocks in `namespace`, naming each first."""
    script = []
    for line, code in blocks(read(path)):
        where = f"{path}:{line}"
        script.append(
            f"print({where!r}, flush=True)\n"
            f"exec(compile({code!r}, {where!r}, 'exec'), {namespace})\n"
        )
    return script


# The blocks train (tiny) models for minutes: the slow tier, once.
@tiny.ONCE
@pytest.mark.slow
class DocsTest(absltest.TestCase):
    def test_every_python_block_runs(self):
        pages = [f"docs/{page}" for page in guide_pages()]
        script = [_PREAMBLE, "_readme = {}\n"]
        script += _page_script("README.md", "_readme")
        script.append("_setup = {}\n")
        script += _page_script(pages[1], "_setup")
        for page in pages[2:]:
            script.append("_page = dict(_setup)\n")
            script += _page_script(page, "_page")
        script.append("assert _initialized, 'the multi-host block ran'\n")
        expected = sum(
            len(blocks(read(path))) for path in ["README.md"] + pages
        )
        folder = self.create_tempdir().full_path
        environment = dict(
            os.environ,
            PYTHONPATH=_ROOT,
            TF_CPP_MIN_LOG_LEVEL="3",
            TFDS_DATA_DIR=os.path.join(folder, "tfds"),
        )
        result = watchdog.run(
            [sys.executable, "-c", "\n".join(script)],
            cwd=folder,
            env=environment,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        reached = re.findall(r"^\S+\.md:\d+$", result.stdout, re.M)
        self.assertEqual(
            result.returncode,
            0,
            f"failed in the block after {reached[-1:] or 'the preamble'}:\n"
            + result.stderr[-3000:],
        )
        self.assertLen(reached, expected)
