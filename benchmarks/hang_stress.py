"""Runs the two runs that were once seen to hang, many times, and counts.

Two cases (issue 32), each `--runs` times in a fresh process under the
test suite's watchdog (`tests/watchdog.py`: a run that does not end dumps
every thread's stack and counts as a hang):

- `two_devices`: the JAX two-device test's run, `python -m
  tests.distributed_run data_parallel OUT.npz` (every teacher and term on
  1 and on 2 host devices, `keras.distribution.DataParallel`), with the
  configurations of `--kinds` (all by default);
- `cached_steps`: a cached teacher's `fit` on a repeated `tf.data`
  dataset with the user's own `steps_per_epoch` and `initial_epoch`
  (TensorFlow), which once timed out at 300 s and then passed in 6 s.

Prints one line per run (seconds, or the hang with the stacks' end) and
a summary per case:

    python benchmarks/hang_stress.py                        # 20 each
    python benchmarks/hang_stress.py --runs 3 --cases cached_steps
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests import distributed_run  # noqa: E402
from tests import watchdog  # noqa: E402

CASES = ("two_devices", "cached_steps")

# The user's own steps and initial epoch over a cached teacher's rows: 4
# batches of 16 a pass, 3 steps an epoch, epochs 2 to 4 of 4.
CACHED_STEPS = """
import sys
import time
import keras
import numpy as np
import tensorflow as tf
import keras_selfdistill as ksd
from tests import tiny, watchdog

watchdog.arm()
start = time.perf_counter()


def phase(name):
    # Where the time went, for a run much slower than the others.
    print(f"{name} {time.perf_counter() - start:.1f}", flush=True)


class Epochs(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        phase(f"epoch{epoch}")


directory = sys.argv[1]
x, y = tiny.data(n=64)
ids = ksd.data.with_sample_ids(tf.data.Dataset.from_tensor_slices(x))
ksd.cache.write_teacher_outputs(
    tiny.mlp(seed=5, name="teacher"), ids.batch(16), directory, 64, verbose=0
)
phase("written")
data = ksd.data.with_sample_ids(tf.data.Dataset.from_tensor_slices((x, y)))
data = data.shuffle(64, seed=0).batch(16).repeat()
distiller = ksd.Distiller(
    tiny.mlp(seed=0),
    [ksd.terms.Distillation(ksd.teachers.Cached(directory), xi=0.5)],
)
distiller.compile(optimizer="adam", loss=tiny.sparse_ce())
phase("built")
history = distiller.fit(
    data,
    epochs=4,
    initial_epoch=1,
    steps_per_epoch=3,
    verbose=0,
    callbacks=[Epochs()],
)
assert len(history.history["loss"]) == 3, history.history
assert int(distiller.optimizer.iterations) == 9
assert np.isfinite(history.history["loss"]).all()
"""


def _command(case, folder, kinds):
    """The case's command and the environment it adds."""
    if case == "two_devices":
        out = os.path.join(folder, "out.npz")
        command = ["-m", "tests.distributed_run", "data_parallel", out]
        # As `tests/distribution_test.py` runs it.
        env = {"KERAS_BACKEND": "jax", **distributed_run.JAX_ENV}
        return [sys.executable, *command, *kinds], env
    command = [sys.executable, "-c", CACHED_STEPS, folder]
    return command, {"KERAS_BACKEND": "tensorflow"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs a case")
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated cases"
    )
    parser.add_argument(
        "--kinds", default="", help="two_devices: configurations (all)"
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds a run may take"
    )
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    summary = {}
    for case in args.cases.split(","):
        if case not in CASES:
            parser.error(f"cases are {', '.join(CASES)}; got {case!r}")
        seconds, failures = [], []
        for run in range(args.runs):
            with tempfile.TemporaryDirectory() as folder:
                command, env = _command(case, folder, kinds)
                start = time.perf_counter()
                try:
                    result = watchdog.run(
                        command,
                        timeout=args.timeout,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env),
                        cwd=ROOT,
                        capture_output=True,
                        text=True,
                    )
                    error = None
                    if result.returncode != 0:
                        error = result.stderr[-3000:]
                except AssertionError as hang:
                    error = str(hang)
            took = time.perf_counter() - start
            if error is None:
                seconds.append(took)
                # The child's own phases, seconds from its start (the
                # cached case; Python and TensorFlow start before them).
                phases = " ".join(result.stdout.split())
                print(
                    f"{case} run {run + 1}: {took:.1f} s"
                    + (f" ({phases})" if phases else ""),
                    flush=True,
                )
            else:
                failures.append(error)
                print(f"{case} run {run + 1}: FAILED after {took:.0f} s")
                print(error, flush=True)
        summary[case] = (seconds, failures)
    for case, (seconds, failures) in summary.items():
        spread = (
            f"median {statistics.median(seconds):.1f} s, max "
            f"{max(seconds):.1f} s"
            if seconds
            else "no run ended"
        )
        print(
            f"{case}: {len(seconds)} of {len(seconds) + len(failures)} "
            f"ended ({spread}); {len(failures)} failed or hung"
        )
    return summary


if __name__ == "__main__":
    main()
