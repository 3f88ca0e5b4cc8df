"""Run the teacher once, write its outputs, train students from the cache.

A CNN teacher is trained, then run once over the training images: its
outputs are written to disk under each image's sample id
(`ksd.cache.write_teacher_outputs`) as a dense cache (every class), a
top-k cache and two sampled caches (RS-KD's independent draws, and
systematic draws). Students then train from each cache
(`ksd.teachers.Cached`), with no teacher forward in the step, against
cross-entropy alone and KD from the live teacher, for the same epochs
and seed. Printed: test accuracy, seconds per epoch, the writer's
samples per second and the bytes per sample on disk.

Two more things a cache must get right are shown: a writer stopped
halfway and restarted writes the same files as an uninterrupted one, and
a pipeline that augments at random is refused, since a cache holds one
target per sample.

By default, the 5,000 MNIST digits bundled with keras_selfdistill (no
network needed); the full Fashion-MNIST from Debian's
`dataset-fashion-mnist`, or the full MNIST downloaded by TensorFlow
Datasets (failing at once when offline):

    python examples/cached_teacher.py
    python examples/cached_teacher.py --data fashion_mnist
"""

import argparse
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf

import keras_selfdistill as ksd
from keras_selfdistill import demo

TEMPERATURE = 4.0
XI = 0.9
# (name, kind, k, sampling): the caches written, in this order.
CACHES = (
    ("dense", "dense", None, None),
    ("top_k", "top_k", 3, None),
    ("sampled", "sampled", 8, None),
    ("systematic", "sampled", 8, "systematic"),
)
METHODS = ("ce", "live") + tuple(name for name, *_ in CACHES)


def load(source, limit):
    """`(x, y), (x_test, y_test)` as NumPy arrays, the first `limit`."""
    (x, y), (x_test, y_test) = ksd.datasets.load(source)
    if limit:
        x, y, x_test, y_test = (
            x[:limit],
            y[:limit],
            x_test[:limit],
            y_test[:limit],
        )
    return (x, y), (x_test, y_test)


def _ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def train_teacher(x, y, epochs):
    teacher = demo.teacher_model()
    teacher.compile(keras.optimizers.Adam(1e-3), _ce(), metrics=["accuracy"])
    teacher.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return teacher


def folder_bytes(directory):
    """Bytes of the cache's `.npy` files (the manifest left out)."""
    total = 0
    for folder, _, files in os.walk(directory):
        total += sum(
            os.path.getsize(os.path.join(folder, name))
            for name in files
            if name.endswith(".npy")
        )
    return total


def write_caches(teacher, inputs, root):
    """Writes every cache of `CACHES` under `root`.

    Returns `{name: (directory, samples per second, bytes per sample)}`.
    """
    num_samples = len(inputs[ksd.data.SAMPLE_ID])
    caches = {}
    for name, kind, k, sampling in CACHES:
        directory = os.path.join(root, name)
        start = time.perf_counter()
        ksd.cache.write_teacher_outputs(
            teacher,
            inputs,
            directory,
            num_samples,
            kind=kind,
            k=k,
            # Sparse targets are read at the temperature they were written
            # at; a dense cache at any.
            temperature=TEMPERATURE,
            sampling=sampling,
            verbose=0,
        )
        seconds = time.perf_counter() - start
        caches[name] = (
            directory,
            num_samples / seconds,
            folder_bytes(directory) / num_samples,
        )
    return caches


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.start)


def train_student(method, teacher, caches, inputs, y, epochs, seed):
    """A student trained by `method`, and its seconds per epoch.

    `ce` is cross-entropy alone, `live` KD from the teacher model, any
    other method KD from that cache: `T = 4`, `ξ = 0.9`, Adam 1e-3, the
    same seed for all.
    """
    keras.utils.set_random_seed(seed)
    terms = []
    if method != "ce":
        source = (
            teacher
            if method == "live"
            else ksd.teachers.Cached(caches[method][0])
        )
        terms = [ksd.terms.Distillation(source, temperature=TEMPERATURE, xi=XI)]
    distiller = ksd.Distiller(demo.student_model(), terms)
    distiller.compile(keras.optimizers.Adam(1e-3), _ce(), metrics=["accuracy"])
    timer = EpochTimer()
    # NumPy inputs with ids: each sample's cached rows are joined once,
    # when `fit` starts, and sliced with the batch.
    distiller.fit(
        inputs, y, epochs=epochs, batch_size=64, verbose=0, callbacks=[timer]
    )
    later = timer.times[1:] or timer.times
    return distiller, float(np.median(later))


def restart_writer(teacher, inputs, directory, reference):
    """Stops a dense writer halfway, restarts it, compares with `reference`.

    The first writer gets the first half of the samples only (its data run
    out, as when a job is killed midway); the second, the same call on all
    of them, keeps the rows written and runs the teacher on the rest.
    Returns whether every file equals the uninterrupted cache's.
    """
    num_samples = len(inputs[ksd.data.SAMPLE_ID])
    half = {key: value[: num_samples // 2] for key, value in inputs.items()}
    settings = dict(temperature=TEMPERATURE, verbose=0)
    try:
        ksd.cache.write_teacher_outputs(
            teacher, half, directory, num_samples, **settings
        )
    except ValueError as error:  # the data held fewer than num_samples
        print(f"stopped writer: {str(error).splitlines()[0][:100]}...")
    ksd.cache.write_teacher_outputs(
        teacher, inputs, directory, num_samples, **settings
    )
    same = True
    for folder, _, files in os.walk(reference):
        mine = os.path.join(directory, os.path.relpath(folder, reference))
        for name in files:
            with open(os.path.join(folder, name), "rb") as a:
                with open(os.path.join(mine, name), "rb") as b:
                    same &= a.read() == b.read()
    return same


def augmentation_refused(caches, inputs, y):
    """The error of a `fit` whose pipeline adds random noise to the inputs.

    The cache holds the teacher's outputs for the un-augmented images;
    the first visit of each sample checks the inputs' hash against them.
    """
    noisy = tf.data.Dataset.from_tensor_slices((inputs, y)).map(
        lambda x, y: (
            dict(
                x, inputs=x["inputs"] + tf.random.normal(tf.shape(x["inputs"]))
            ),
            y,
        )
    )
    distiller = ksd.Distiller(
        demo.student_model(),
        [
            ksd.terms.Distillation(
                ksd.teachers.Cached(caches["dense"][0]), temperature=TEMPERATURE
            )
        ],
    )
    distiller.compile("adam", _ce())
    try:
        distiller.fit(noisy.batch(64), epochs=1, verbose=0)
    except ValueError as error:
        return str(error)
    return None


def build_parser():
    """The command line, every option described."""
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data",
        choices=ksd.datasets.sources.NAMES,
        default="bundled_mnist",
        help="bundled_mnist (offline, default), fashion_mnist (Debian "
        "files) or mnist (downloads)",
    )
    parser.add_argument(
        "--epochs", type=int, default=20, help="student epochs (default 20)"
    )
    parser.add_argument(
        "--teacher-epochs",
        type=int,
        default=10,
        help="teacher epochs (default 10)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="the students' seed (default 0)"
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only the first N train and test images (smoke tests)",
    )
    parser.add_argument(
        "--output-dir",
        default="outputs",
        help="where the caches and the student are written (default outputs)",
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    (x, y), (x_test, y_test) = load(args.data, args.limit)
    keras.utils.set_random_seed(100)
    teacher = train_teacher(x, y, args.teacher_epochs)
    teacher_accuracy = teacher.evaluate(x_test, y_test, verbose=0)[1]
    print(f"teacher: test accuracy {100 * teacher_accuracy:.2f}%")

    root = os.path.join(args.output_dir, "caches")
    shutil.rmtree(root, ignore_errors=True)
    inputs = ksd.data.with_sample_ids(x)
    caches = write_caches(teacher, inputs, root)
    print("\n| cache | writer samples/s | bytes per sample |")
    print("|---|---|---|")
    for name, (_, rate, size) in caches.items():
        print(f"| {name} | {rate:,.0f} | {size:,.1f} |")

    result = {"teacher_accuracy": teacher_accuracy, "caches": caches}
    print(
        f"\n{args.epochs} epochs, batch 64, T = {TEMPERATURE}, ξ = {XI}, "
        f"seed {args.seed}\n"
    )
    print("| student | test accuracy % | seconds per epoch |")
    print("|---|---|---|")
    for method in METHODS:
        distiller, seconds = train_student(
            method, teacher, caches, inputs, y, args.epochs, args.seed
        )
        accuracy = distiller.evaluate(
            x_test, y_test, verbose=0, return_dict=True
        )["accuracy"]
        result[method] = {"accuracy": accuracy, "seconds_per_epoch": seconds}
        print(f"| {method} | {100 * accuracy:.2f} | {seconds:.3f} |")
        if method == "dense":
            path = os.path.join(args.output_dir, "student.keras")
            distiller.student.save(path)

    restarted = os.path.join(root, "restarted")
    result["restart_identical"] = restart_writer(
        teacher, inputs, restarted, caches["dense"][0]
    )
    print(
        "\nrestarted writer equals the uninterrupted one: "
        f"{result['restart_identical']}"
    )
    result["augmentation_error"] = augmentation_refused(caches, inputs, y)
    first = (result["augmentation_error"] or "not refused").split(". ")[0]
    print(f"random augmentation with a cache: {first}.")
    return result


if __name__ == "__main__":
    main()
