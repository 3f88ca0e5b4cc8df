"""The package, its examples and benchmarks never unpickle or load unsafely."""

import ast
import pathlib

from absl.testing import parameterized

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted(
    path
    for folder in ("keras_selfdistill", "examples", "benchmarks")
    for path in (ROOT / folder).rglob("*.py")
)


def _problems(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names]
            module = getattr(node, "module", None) or ""
            if any(
                n.split(".")[0] in ("pickle", "dill", "cloudpickle")
                for n in names + [module]
            ):
                found.append(f"line {node.lineno}: imports a pickle module")
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        safe = keywords.get("safe_mode")
        if isinstance(safe, ast.Constant) and safe.value is False:
            found.append(f"line {node.lineno}: safe_mode=False")
        allow = keywords.get("allow_pickle")
        if isinstance(allow, ast.Constant) and allow.value is True:
            found.append(f"line {node.lineno}: allow_pickle=True")
        function = node.func
        name = getattr(function, "attr", getattr(function, "id", ""))
        if name == "load" and isinstance(function, ast.Attribute):
            owner = getattr(function.value, "id", "")
            if owner in ("np", "numpy") and not (
                isinstance(allow, ast.Constant) and allow.value is False
            ):
                found.append(
                    f"line {node.lineno}: np.load without allow_pickle=False"
                )
    return found


class SecurityScanTest(parameterized.TestCase):
    def test_sources_were_found(self):
        self.assertGreater(len(SOURCES), 20)

    def test_no_pickle_and_no_unsafe_loading(self):
        problems = {
            str(path.relative_to(ROOT)): _problems(path) for path in SOURCES
        }
        self.assertEqual({k: v for k, v in problems.items() if v}, {})

    def test_the_scan_catches_each_pattern(self):
        sample = pathlib.Path(self.create_tempdir().full_path) / "bad.py"
        sample.write_text(
            "import pickle\n"
            "import numpy as np\n"
            "np.load('a.npy')\n"
            "np.load('b.npy', allow_pickle=True)\n"
            "keras.saving.load_model('m.keras', safe_mode=False)\n"
        )
        # np.load without allow_pickle=False is flagged for both files.
        found = _problems(sample)
        self.assertLen(found, 5)
