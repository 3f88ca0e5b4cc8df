"""Where the bare Distiller's epoch time goes: its input checks.

Interleaved epochs, as in `overhead.py` (same pair, data and batch size),
of plain `student.fit`, the Distiller with no terms and with cached
teacher KD, each with the input checks on (the default) and off
(`check_data=False`). Reports the median and the minimum epoch per variant
and their ratios to plain `fit`.

With `--input numpy` each timed unit is one `fit` of `--epochs` epochs on
the NumPy arrays, as the demo feeds them; the table then has three
parts: the `fit` call's whole time per epoch (its setup and tracing
included); the steady epoch, the median of the epochs after the first,
timed from `on_epoch_begin` to `on_epoch_end`; and every epoch after the
first of every round, whose minimum is the variant's epoch without
interference (BENCHMARKS.md: epoch times here are bimodal, and the median
of a `fit` mixes the two modes).

    python benchmarks/distiller_floor.py [--rounds 9]
    python benchmarks/distiller_floor.py --input numpy --epochs 30
    KERAS_BACKEND=jax python benchmarks/distiller_floor.py --input numpy

On JAX every model is compiled with `jit` (Keras's default there); on
TensorFlow none uses XLA.
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_selfdistill as ksd  # noqa: E402
from keras_selfdistill import demo  # noqa: E402

# XLA is slower than TensorFlow's graphs on this CPU (BENCHMARKS.md); JAX
# without `jit` runs op by op, so JAX compiles as Keras does by default.
JIT = keras.backend.backend() == "jax"


class _EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self.start
        self.times.append(self.seconds)


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def demo_cache(prefix):
    """The bundled MNIST, the demo's (untrained) teacher, its dense cache
    in a new directory named with `prefix`, and a demo student:
    `(x, y, teacher, directory, student)`, seeded."""
    (x, y), _ = ksd.datasets.load_mnist()
    keras.utils.set_random_seed(0)
    teacher = demo.teacher_model()
    directory = tempfile.mkdtemp(prefix=prefix)
    ksd.cache.write_teacher_outputs(
        teacher, ksd.data.with_sample_ids(x), directory, len(y), verbose=0
    )
    return x, y, teacher, directory, demo.student_model()


def _hand_written_kd(y_true, y_pred):
    ops = keras.ops
    labels = ops.cast(y_true[:, 0], "int32")
    teacher = y_true[:, 1:] / 4.0
    student = y_pred / 4.0
    log_p = ops.log_softmax(teacher)
    kl = ops.sum(ops.exp(log_p) * (log_p - ops.log_softmax(student)), -1)
    ce = keras.losses.sparse_categorical_crossentropy(
        labels, y_pred, from_logits=True
    )
    return 0.1 * ce + 0.9 * 16.0 * kl


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--input", choices=["dataset", "numpy"], default="dataset"
    )
    parser.add_argument(
        "--epochs", type=int, default=4, help="epochs per fit, NumPy input"
    )
    args = parser.parse_args(argv)
    (x, y), _ = ksd.datasets.load_mnist()
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(64).cache()
    train = train.repeat(4)
    with_ids = ksd.data.with_sample_ids(
        tf.data.Dataset.from_tensor_slices((x, y))
    )
    with_ids = with_ids.batch(64).cache().repeat(4)
    keras.utils.set_random_seed(0)
    teacher = demo.teacher_model()
    teacher.compile("adam", _loss(), jit_compile=JIT)
    teacher.fit(train, epochs=1, verbose=0)
    cache = tempfile.mkdtemp(prefix="floor_cache_")
    ksd.cache.write_teacher_outputs(
        teacher, ksd.data.with_sample_ids(x), cache, len(y), verbose=0
    )
    student = demo.student_model()

    def copy(name):
        clone = keras.models.clone_model(student)
        clone.set_weights(student.get_weights())
        clone.name = name
        return clone

    def distiller(name, terms, check_data):
        model = ksd.Distiller(copy(name), terms, check_data=check_data)
        model.compile("adam", _loss(), jit_compile=JIT)
        return model

    def cached_kd():
        return [
            ksd.terms.Distillation(
                ksd.teachers.Cached(cache), temperature=4.0, xi=0.9
            )
        ]

    log_probs = keras.ops.convert_to_numpy(
        keras.ops.log_softmax(teacher.predict(x, verbose=0))
    )
    y_kd = np.concatenate([y[:, None], log_probs], axis=1).astype("float32")
    kd_data = tf.data.Dataset.from_tensor_slices((x, y_kd)).batch(64)
    kd_data = kd_data.cache().repeat(4)
    if args.input == "numpy":
        train = (x, y)
        with_ids = (ksd.data.with_sample_ids(x), y)
        kd_data = (x, y_kd)
    plain = copy("plain")
    plain.compile("adam", _loss(), jit_compile=JIT)
    hand_written = copy("hand_written")
    hand_written.compile("adam", _hand_written_kd, jit_compile=JIT)
    variants = {
        "plain `student.fit`": (plain, train),
        "plain `student.fit`, hand-written KD loss": (hand_written, kd_data),
        "Distiller, no terms": (distiller("a", [], True), train),
        "Distiller, no terms, `check_data=False`": (
            distiller("b", [], False),
            train,
        ),
        "Distiller, cached KD": (distiller("c", cached_kd(), True), with_ids),
        "Distiller, cached KD, `check_data=False`": (
            distiller("d", cached_kd(), False),
            with_ids,
        ),
    }

    def seconds_per_epoch(model, data):
        """The epoch's seconds: `(whole fit / epochs, steady epoch, the
        epochs after the first)`."""
        timer = _EpochTimer()
        if args.input == "dataset":
            model.fit(data, epochs=1, verbose=0, callbacks=[timer])
            return timer.seconds, timer.seconds, [timer.seconds]
        start = time.perf_counter()
        model.fit(
            *data,
            batch_size=64,
            epochs=args.epochs,
            verbose=0,
            callbacks=[timer],
        )
        whole = (time.perf_counter() - start) / args.epochs
        later = timer.times[1:] or timer.times
        return whole, statistics.median(later), later

    times = {name: [] for name in variants}
    steady = {name: [] for name in variants}
    epochs = {name: [] for name in variants}
    for round_index in range(args.rounds + 1):
        for name, (model, data) in variants.items():
            whole, epoch, later = seconds_per_epoch(model, data)
            if round_index:
                times[name].append(whole)
                steady[name].append(epoch)
                epochs[name].extend(later)
    parts = [("", times)]
    if args.input == "numpy":
        parts = [
            ("whole fit / epochs: ", times),
            ("steady epoch: ", steady),
            ("every later epoch: ", epochs),
        ]
    print(
        "| variant | median epoch s | × plain (median) | min epoch s | "
        "× plain (min) |"
    )
    print("|---|---|---|---|---|")
    for label, part in parts:
        plain_median = statistics.median(part["plain `student.fit`"])
        plain_min = min(part["plain `student.fit`"])
        for name, values in part.items():
            median, low = statistics.median(values), min(values)
            print(
                f"| {label}{name} | {median:.3f} | "
                f"{median / plain_median:.2f} | {low:.3f} | "
                f"{low / plain_min:.2f} |"
            )


if __name__ == "__main__":
    main()
