"""Soak test: resident memory over a long run with every term and teacher.

Trains `demo.blocks_model()` on the bundled MNIST digits with, at once:
auxiliary exits (linear heads on blocks 1–3), PS-KD (`PastPredictions`
with ξ), a mean teacher (`EMA`), epoch snapshots (`Snapshot(keep=2)`) and
a frozen CNN teacher, for `--epochs` epochs, with a validation set and
`keras.callbacks.BackupAndRestore` writing every epoch (the usual long-run
setup). After each epoch it records the process's resident set size
(VmRSS) and reports the growth after epoch `--after` (1-based):
`max(RSS[after+1:]) / RSS[after] - 1`. `--plain` trains the same student
on the same data with no terms, to see what Keras alone does.

    python benchmarks/soak.py [--epochs 50] [--train N] [--after 2] [--plain]
    KERAS_BACKEND=jax python benchmarks/soak.py
"""

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_selfdistill as ksd  # noqa: E402
from keras_selfdistill import demo  # noqa: E402


def _rss_mb():
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class _Memory(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rss, self.seconds = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        self.rss.append(_rss_mb())


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--train", type=int, default=None)
    parser.add_argument("--after", type=int, default=2)
    parser.add_argument(
        "--plain",
        action="store_true",
        help="the same student and data with no terms (Keras alone)",
    )
    args = parser.parse_args()

    (x, y), (x_test, y_test) = ksd.datasets.load_mnist()
    if args.train:
        x, y = x[: args.train], y[: args.train]
    keras.utils.set_random_seed(0)
    teacher = demo.teacher_model()
    teacher.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    teacher.fit(x, y, batch_size=64, epochs=1, verbose=0)
    student = demo.blocks_model()
    terms = (
        []
        if args.plain
        else [
            ksd.terms.AuxiliaryExits(["block1", "block2", "block3"]),
            ksd.terms.Distillation(
                ksd.teachers.PastPredictions(len(x), 10),
                xi=ksd.schedules.LinearRampUp(ramp_up_epochs=10, end=0.5),
                name="pskd",
            ),
            ksd.terms.Distillation(
                ksd.teachers.EMA(0.99), weight=0.5, name="mean_teacher"
            ),
            ksd.terms.Distillation(
                ksd.teachers.Snapshot(keep=2), weight=0.3, name="snapshot"
            ),
            ksd.terms.Distillation(
                teacher, temperature=4.0, weight=0.5, name="teacher"
            ),
        ]
    )
    # Plain: the student itself, compiled and fitted by Keras alone.
    distiller = student if args.plain else ksd.Distiller(student, terms)
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    train = tf.data.Dataset.from_tensor_slices((x, y))
    if not args.plain:
        train = ksd.data.with_sample_ids(train)
    train = train.shuffle(len(x), seed=0).batch(64)
    memory = _Memory()
    with tempfile.TemporaryDirectory() as backup:
        distiller.fit(
            train,
            validation_data=(x_test, y_test),
            epochs=args.epochs,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup), memory],
        )
    rss = np.asarray(memory.rss)
    base = rss[args.after - 1]
    growth = rss[args.after :].max() / base - 1
    print(
        f"{'plain Keras' if args.plain else 'all terms'}, "
        f"backend {keras.backend.backend()}, {platform.processor() or 'cpu'}"
        f", {os.cpu_count()} cores; {args.epochs} epochs of {len(x)} images,"
        f" median epoch {np.median(memory.seconds):.2f} s"
    )
    print("RSS MB per epoch:", " ".join(f"{v:.0f}" for v in rss))
    print(
        f"RSS after epoch {args.after}: {base:.0f} MB; largest later: "
        f"{rss[args.after :].max():.0f} MB; growth {100 * growth:+.2f}% "
        f"(last epoch {100 * (rss[-1] / base - 1):+.2f}%)"
    )


if __name__ == "__main__":
    main()
