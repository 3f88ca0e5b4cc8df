"""The example scripts, loaded as modules by the benchmarks that reuse
them."""

import importlib.util
import os
import sys


def load(name):
    """The module of `examples/<name>.py`, registered under `name`."""
    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "examples",
        f"{name}.py",
    )
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
