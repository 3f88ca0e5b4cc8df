"""One process of a multi-host JAX run; run as a script.

`python -m tests.multihost_run PROCESS_ID NUM_PROCESSES PORT OUT.npz`

With NUM_PROCESSES > 1 each process joins the cluster at 127.0.0.1:PORT
with `keras.distribution.initialize` (gloo collectives between CPU
processes), trains a `DataParallel` Distiller over every process's device
for 2 epochs, and writes its own copy of every variable. With
NUM_PROCESSES = 1 it trains alone, without distribution: the reference.
"""

import os
import sys

import numpy as np

os.environ["KERAS_BACKEND"] = "jax"


def main(process_id, num_processes, port, out):
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
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices())
        )
    import tensorflow as tf

    import keras_selfdistill as ksd

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.integers(0, 3, size=32)
    keras.utils.set_random_seed(2)
    student = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    bank = ksd.teachers.PastPredictions(32, 3, dtype="float32")
    ema = ksd.teachers.EMA(momentum=0.8)
    distiller = ksd.Distiller(
        student,
        [
            ksd.terms.Distillation(bank, xi=0.5, name="pskd"),
            ksd.terms.Distillation(ema, weight=0.3, name="mean_teacher"),
        ],
    )
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    # The global dataset, identical on every process: Keras gives each
    # process its share of every global batch.
    data = ksd.data.with_sample_ids(tf.data.Dataset.from_tensor_slices((x, y)))
    history = distiller.fit(data.batch(8), epochs=2, verbose=0).history
    state = {f"history/{k}": np.asarray(v) for k, v in history.items()}
    for i, variable in enumerate(distiller.variables):
        # Replicated: every process holds the whole value.
        state[f"variable/{i}"] = np.asarray(variable.value.addressable_data(0))
    state["devices"] = np.asarray(len(jax.devices()))
    np.savez(out, **state)


if __name__ == "__main__":
    from tests import watchdog

    watchdog.arm()
    main(*sys.argv[1:])
