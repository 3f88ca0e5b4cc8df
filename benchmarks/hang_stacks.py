"""Runs the JAX two-device harness again and again; takes the stacks of a hang.

Each run is `python -m tests.distributed_run data_parallel OUT.npz` with
the harness's environment (`tests.distributed_run.JAX_ENV`, or the pool
at XLA's default with `--default-pool`), XLA's logging on and
`--xla_cpu_collective_call_warn_stuck_timeout_seconds=20`. When XLA logs
that a collective may be stuck, every thread's native stack is written
with `gdb -p PID -batch -ex "thread apply all bt"` to `OUT/runN.gdb`; the
run is then given 5 minutes to move on before it is killed. Each run's
log is `OUT/runN.log`, and one line a run is printed:

    python benchmarks/hang_stacks.py --runs 10 --out /tmp/stacks
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests import distributed_run  # noqa: E402

STUCK_FLAG = " --xla_cpu_collective_call_warn_stuck_timeout_seconds=20"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", required=True, help="folder for the logs")
    parser.add_argument(
        "--default-pool",
        action="store_true",
        help="leave XLA's CPU thread pool at its default size",
    )
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="0")
    env.update(distributed_run.JAX_ENV)
    env["XLA_FLAGS"] += STUCK_FLAG
    if args.default_pool:
        env.pop("PJRT_NPROC")
    for run in range(args.runs):
        path = os.path.join(args.out, f"run{run}")
        start = time.perf_counter()
        command = [sys.executable, "-m", "tests.distributed_run"]
        process = subprocess.Popen(
            command + ["data_parallel", path + ".npz"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        stuck = False
        with open(path + ".log", "w") as log:
            for line in process.stdout:
                log.write(line)
                if "may be stuck" in line and not stuck:
                    stuck = True
                    log.flush()
                    with open(path + ".gdb", "w") as stacks:
                        subprocess.run(
                            ["gdb", "-p", str(process.pid), "-batch"]
                            + ["-ex", "thread apply all bt"],
                            stdout=stacks,
                            stderr=subprocess.STDOUT,
                        )
                    try:
                        process.wait(timeout=300)
                    except subprocess.TimeoutExpired:
                        process.kill()
                    break
        process.wait()
        seen = f"STUCK, stacks in {path}.gdb" if stuck else "not stuck"
        seconds = time.perf_counter() - start
        print(
            f"run {run}: exit {process.returncode}, {seen}, {seconds:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
