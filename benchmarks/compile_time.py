"""Why the fast tier's JAX pass compiles without most XLA optimisations.

Builds the tests' tiny UNet (`tests/diffusion/reference.py`) in a fresh
process on JAX, with and without `JAX_DISABLE_MOST_OPTIMIZATIONS=1`, and
prints the seconds each took: on CPU, XLA compiles every random
initialiser for each new variable shape, which takes longer than the
tests' tiny models take to run.

    python benchmarks/compile_time.py --repeats 3
"""

import argparse
import os
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BUILD = """
import time
import keras
import keras_selfdistill as ksd
from tests.diffusion import reference

start = time.perf_counter()
reference.unet(keras, ksd, seed=1)
print(time.perf_counter() - start)
"""


def build_seconds(disable_optimizations):
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=_ROOT)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    if disable_optimizations:
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", _BUILD],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=_ROOT,
    )
    return float(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    for label, flag in (("optimised", False), ("most disabled", True)):
        times = [build_seconds(flag) for _ in range(args.repeats)]
        print(
            f"UNet build, XLA {label}: "
            + ", ".join(f"{t:.1f}" for t in times)
            + " s"
        )


if __name__ == "__main__":
    main()
