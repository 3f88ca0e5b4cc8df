"""XLA's CPU client deadlocks on 2 host devices with a small thread pool.

Plain JAX, no Keras and no keras_selfdistill (issue 32): eager operations
on 2 CPU devices (`--xla_force_host_platform_device_count=2`), a matrix
product, a mean over the sharded batch (an all-reduce) and an update,
dispatched one by one as a training step run op by op dispatches them.
XLA's CPU client runs every device's part of a program, and every launch,
on one pool of `max(cores, devices)` threads (`PJRT_NPROC` or `NPROC`
overrides the cores). A device's part of the all-reduce waits in one
thread for the other device's; a launch whose device already has 32
computations in flight waits in another for them to run, which needs a
free thread. With 2 devices, up to 3 threads can wait so (1 in the
all-reduce, 2 launching from the Python thread): a pool of 2 or 3 threads
hangs, a pool of 4 does not.

Prints the iterations done, or that they stopped; run each pool size in
its own process (the pool is sized when JAX starts):

    PJRT_NPROC=2 python benchmarks/cpu_pool_deadlock.py   # hangs
    PJRT_NPROC=4 python benchmarks/cpu_pool_deadlock.py   # runs 60 s
"""

import argparse
import faulthandler
import os
import sys
import threading
import time

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=2"
    " --xla_cpu_collective_timeout_seconds=3600"
    " --xla_cpu_collective_call_terminate_timeout_seconds=3600",
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument(
        "--stall", type=float, default=20, help="seconds without progress"
    )
    args = parser.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:2]), ("batch",))
    x = jax.device_put(
        jnp.ones((8, 16)), NamedSharding(mesh, PartitionSpec("batch"))
    )
    w = jax.device_put(jnp.eye(16), NamedSharding(mesh, PartitionSpec()))
    done = [0]
    start = time.perf_counter()
    pool = os.environ.get("PJRT_NPROC", os.environ.get("NPROC", "cores"))

    def watch():
        last, seen = -1, time.perf_counter()
        while True:
            time.sleep(1)
            if done[0] != last:
                last, seen = done[0], time.perf_counter()
            elif time.perf_counter() - seen > args.stall:
                print(
                    f"PJRT_NPROC={pool}: HUNG after {done[0]} iterations "
                    f"({seen - start:.1f} s); no progress for "
                    f"{args.stall:.0f} s. Every thread's Python stack:",
                    flush=True,
                )
                faulthandler.dump_traceback(all_threads=True)
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    while time.perf_counter() - start < args.seconds:
        y = jnp.tanh(x @ w)
        mean = y.mean(axis=0)
        w = w - 1e-6 * jnp.outer(mean, mean)
        done[0] += 1
    float(w[0, 0])
    print(
        f"PJRT_NPROC={pool}: {done[0]} iterations in {args.seconds:.0f} s, "
        "no hang",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
