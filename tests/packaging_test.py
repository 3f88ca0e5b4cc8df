import json
import os
import shutil
import sys
import zipfile

from absl.testing import parameterized

from tests import tiny
from tests import watchdog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "keras_selfdistill")


def _run(*args, cwd=None):
    result = watchdog.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )
    if result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


@tiny.ONCE
class PackagingTest(parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        import tempfile

        cls.folder = tempfile.mkdtemp()
        source = os.path.join(cls.folder, "source")
        os.makedirs(source)
        for name in SOURCES:
            path = os.path.join(ROOT, name)
            if os.path.isdir(path):
                shutil.copytree(
                    path,
                    os.path.join(source, name),
                    ignore=shutil.ignore_patterns("__pycache__"),
                )
            else:
                shutil.copy(path, source)
        cls.dist = os.path.join(cls.folder, "dist")
        _run("build", "--no-isolation", "--outdir", cls.dist, cwd=source)
        cls.wheel = next(
            os.path.join(cls.dist, f)
            for f in os.listdir(cls.dist)
            if f.endswith(".whl")
        )

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.folder, ignore_errors=True)
        super().tearDownClass()

    def test_wheel_and_sdist_pass_twine_check(self):
        files = sorted(os.listdir(self.dist))
        self.assertLen(files, 2)
        self.assertTrue(files[0].endswith(".whl"), files)
        self.assertTrue(files[1].endswith(".tar.gz"), files)
        output = _run(
            "twine",
            "check",
            "--strict",
            *(os.path.join(self.dist, f) for f in files),
        )
        self.assertEqual(output.count("PASSED"), 2, output)
        with zipfile.ZipFile(self.wheel) as wheel:
            names = set(wheel.namelist())
        for name in (
            "keras_selfdistill/datasets/data/mnist_5k.npz",
            "keras_selfdistill/datasets/data/LICENSES.md",
            "keras_selfdistill/datasets/builders/local_fashion_mnist.py",
            "keras_selfdistill/plots.py",
        ):
            self.assertIn(name, names)

    def test_installs_beside_preinstalled_tensorflow_and_keras(self):
        # This environment has the tested TensorFlow and Keras, as Colab
        # has its own: installing the wheel must plan nothing else.
        report = os.path.join(self.folder, "report.json")
        _run(
            "pip",
            "install",
            "--dry-run",
            "--no-index",
            "--quiet",
            "--report",
            report,
            f"{self.wheel}[plots]",
        )
        with open(report) as file:
            planned = [
                item["metadata"]["name"] for item in json.load(file)["install"]
            ]
        self.assertEqual(planned, ["keras-selfdistill"])
