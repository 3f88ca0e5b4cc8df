"""One process of a two-process JAX fit whose shards may differ in steps.

`python -m tests.multihost_steps_run PROCESS_ID PORT OUT.json CASE`

Both processes join the cluster at 127.0.0.1:PORT (gloo collectives
between CPU processes) and fit a `DataParallel` Distiller on 36 samples
in global batches of 8: the last batch of 4 leaves process 0 five
batches and process 1 four. CASE `uneven` fits it as it is (without the
check, process 0's fifth step waits forever in its all-reduce),
`steps` with `steps_per_epoch=2` (4 steps in all, which both shards
hold), `validation` with that dataset as `validation_data`. Writes
`{"error": message}` when `fit` raises a `ValueError`, else the History.
"""

import json
import os
import sys

import numpy as np

os.environ["KERAS_BACKEND"] = "jax"


def main(process_id, port, out, case):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras

    keras.distribution.initialize(
        job_addresses=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=int(process_id),
    )
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices())
    )
    import tensorflow as tf

    import keras_selfdistill as ksd

    rng = np.random.default_rng(0)
    x = rng.normal(size=(36, 4)).astype("float32")
    y = rng.integers(0, 3, size=36)
    keras.utils.set_random_seed(2)
    student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    distiller = ksd.Distiller(
        student, [ksd.terms.Distillation(ksd.teachers.EMA(momentum=0.8))]
    )
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    uneven = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    even = tf.data.Dataset.from_tensor_slices((x[:32], y[:32])).batch(8)
    arguments = {
        "uneven": dict(x=uneven),
        "steps": dict(x=uneven, steps_per_epoch=2),
        "validation": dict(x=even, validation_data=uneven),
    }[case]
    try:
        history = distiller.fit(epochs=2, verbose=0, **arguments).history
        result = {k: [float(v) for v in vs] for k, vs in history.items()}
    except ValueError as error:
        result = {"error": str(error)}
    with open(out, "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    from tests import watchdog

    watchdog.arm()
    main(*sys.argv[1:])
