"""One process of a multi-process cache writer; run as a script.

`python -m tests.multihost_cache_run PROCESS_ID NUM_PROCESSES PORT
DIRECTORY KIND`: with NUM_PROCESSES > 1 the process joins a JAX cluster at
127.0.0.1:PORT (gloo collectives on CPU) and writes its shards of the
cache of a fixed teacher on the tiny data into DIRECTORY, the writer
taking the process index and count from JAX.
"""

import sys


def main(process_id, num_processes, port, directory, kind):
    process_id, num_processes = int(process_id), int(num_processes)
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras

    if num_processes > 1:
        keras.distribution.initialize(
            job_addresses=f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
        )
    import keras_selfdistill as ksd
    from tests import tiny

    x, _ = tiny.data(n=40)
    ksd.cache.write_teacher_outputs(
        tiny.mlp(seed=5),
        ksd.data.with_sample_ids(x),
        directory,
        num_samples=len(x),
        kind=kind,
        k=None if kind == "dense" else 2,
        temperature=2.0,
        dtype="float32",
        shard_size=8,
        batch_size=16,
        verbose=0,
    )


if __name__ == "__main__":
    from tests import watchdog

    watchdog.arm()
    main(*sys.argv[1:])
