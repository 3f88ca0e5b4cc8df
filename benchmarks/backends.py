"""Epoch time and accuracy per backend, on 1 and on 2 CPU devices.

The same Distiller (the demo's MLP student, or with `--student blocks`
the four-block CNN `demo.blocks_model()`, with PS-KD and a mean teacher,
`PastPredictions` with ξ = 0.5 and `EMA(0.99)`) trains on the bundled
MNIST digits (4,000 train / 1,000 test, batch 64) in a fresh process per
configuration:

- TensorFlow, 1 device, and `MirroredStrategy` over 2 logical CPUs;
- JAX, 1 device, and `keras.distribution.DataParallel` over 2 host
  devices (`XLA_FLAGS=--xla_force_host_platform_device_count=2`).

Reported per configuration: median epoch time over epochs 2..N (epoch 1
compiles), images per second, and test accuracy after N epochs (seed 0);
then the same student with plain `fit` (no terms) on each backend, to
separate the backends' own speed from the library's.

    python benchmarks/backends.py [--epochs 6] [--student mlp|blocks]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

_CHILD = r"""
import json, os, sys, time
backend, devices, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
student, plain = sys.argv[4], sys.argv[5] == "plain"
if backend == "tensorflow" and devices == 2:
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
import tensorflow as tf
import keras_selfdistill as ksd
from keras_selfdistill import demo

(x, y), (x_test, y_test) = ksd.datasets.load_mnist()

def build():
    keras.utils.set_random_seed(0)
    model = demo.blocks_model() if student == "blocks" else demo.student_model()
    distiller = ksd.Distiller(model, [] if plain else [
        ksd.terms.Distillation(ksd.teachers.PastPredictions(len(x), 10),
                               xi=0.5, name="pskd"),
        ksd.terms.Distillation(ksd.teachers.EMA(0.99), weight=0.5,
                               name="mean_teacher"),
    ])
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    return distiller

if backend == "tensorflow":
    strategy = (tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
                if devices == 2 else tf.distribute.get_strategy())
    with strategy.scope():
        distiller = build()
else:
    if devices == 2:
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    distiller = build()

class Clock(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()
    def on_epoch_end(self, epoch, logs=None):
        seconds.append(time.perf_counter() - self.start)

seconds = []
train = ksd.data.with_sample_ids(tf.data.Dataset.from_tensor_slices((x, y)))
train = train.shuffle(len(x), seed=0).batch(64)
distiller.fit(train, epochs=epochs, verbose=0, callbacks=[Clock()])
accuracy = distiller.evaluate(x_test, y_test, verbose=0, return_dict=True)
json.dump({"seconds": seconds, "accuracy": accuracy["accuracy"],
           "images": len(x)}, sys.stdout)
"""


def _run(backend, devices, epochs, student, plain=False):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    if backend == "jax" and devices == 2:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD,
            backend,
            str(devices),
            str(epochs),
            student,
            "plain" if plain else "distiller",
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out[out.index("{") :])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--student", choices=("mlp", "blocks"), default="mlp")
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"CPU cores; student {args.student}; {args.epochs} epochs; "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print(
        f"{'backend':<11} {'devices':>7} {'epoch s':>8} {'images/s':>9} "
        f"{'test acc %':>10}"
    )
    rows = {}
    for backend in ("tensorflow", "jax"):
        for devices in (1, 2):
            result = _run(backend, devices, args.epochs, args.student)
            later = sorted(result["seconds"][1:])
            median = later[len(later) // 2]
            rows[backend, devices] = median
            print(
                f"{backend:<11} {devices:>7} {median:>8.2f} "
                f"{result['images'] / median:>9.0f} "
                f"{100 * result['accuracy']:>10.2f}"
            )
    print(
        "JAX / TensorFlow epoch time, 1 device: "
        f"{rows['jax', 1] / rows['tensorflow', 1]:.2f}×; 2 devices: "
        f"{rows['jax', 2] / rows['tensorflow', 2]:.2f}×"
    )
    # The same student without distillation terms, 1 device: how much of
    # the backend gap is Keras's and XLA's own.
    plain = {
        backend: _run(backend, 1, args.epochs, args.student, plain=True)
        for backend in ("tensorflow", "jax")
    }
    seconds = {
        backend: sorted(result["seconds"][1:])[len(result["seconds"]) // 2 - 1]
        for backend, result in plain.items()
    }
    print(
        f"plain fit (no terms), 1 device: TensorFlow "
        f"{seconds['tensorflow']:.2f} s, JAX {seconds['jax']:.2f} s, "
        f"JAX / TensorFlow {seconds['jax'] / seconds['tensorflow']:.2f}×"
    )


if __name__ == "__main__":
    main()
