"""Cached augmented views against a live teacher under augmentation.

The demo pair on the bundled MNIST (the CNN teacher trained 5 epochs on
the clean 4,000 training images, the MLP student), with random shifts of
up to 3 pixels (zero padding, then a random 28 × 28 crop) as the
augmentation. Students train 10 epochs (Adam 1e-3, batch 64, `T = 4`,
`ξ = 0.9`), the same initial weights and data order per seed, with:

- cross-entropy on the shifted images;
- live KD: the teacher runs on the shifted images at every step;
- cached views: `write_teacher_outputs(augment=shift, views=V)` once, then
  `Cached(augment=shift)` replays the shifts, for `V` = 10 (a new shift
  every epoch, as live) and `V` = 2;
- a cache without augmentation, trained without augmentation.

Reports test accuracy on the 1,000 test images (mean ± standard error,
differences to live KD paired by seed), the median epoch time and the
writer's time.

    python benchmarks/cached_views.py [--seeds 3] [--epochs 10]
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
from cached_teacher import _ce  # noqa: E402
from cached_teacher import _Epochs  # noqa: E402
from cached_teacher import _mean_error  # noqa: E402

import keras_selfdistill as ksd  # noqa: E402
from keras_selfdistill import demo  # noqa: E402

PAD = 3


def shift(x, seed):
    """A stateless random shift of one image by up to 3 pixels."""
    padded = tf.pad(x, [[PAD, PAD], [PAD, PAD], [0, 0]])
    return tf.image.stateless_random_crop(padded, tf.shape(x), seed)


def _random_shift(features, y):
    # The live pipeline's shift: a fresh draw at every visit.
    x = features["inputs"]
    padded = tf.pad(x, [[PAD, PAD], [PAD, PAD], [0, 0]])
    shifted = tf.image.random_crop(padded, tf.shape(x))
    return dict(features, inputs=shifted), y


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args(argv)
    (x, y), (x_test, y_test) = ksd.datasets.load_mnist()
    keras.utils.set_random_seed(0)
    teacher = demo.teacher_model()
    teacher.compile("adam", _ce(), metrics=["accuracy"], jit_compile=False)
    teacher.fit(x, y, epochs=5, batch_size=64, verbose=0)
    teacher_accuracy = teacher.evaluate(x_test, y_test, verbose=0)[1]
    samples = ksd.data.with_sample_ids(x)
    folder = tempfile.mkdtemp(prefix="cached_views_")
    caches, writer_seconds = {}, {}
    for name, kwargs in (
        ("plain", {}),
        ("views 2", {"augment": shift, "views": 2}),
        ("views 10", {"augment": shift, "views": 10}),
    ):
        caches[name] = os.path.join(folder, name.replace(" ", "_"))
        start = time.perf_counter()
        ksd.cache.write_teacher_outputs(
            teacher, samples, caches[name], len(y), verbose=0, **kwargs
        )
        writer_seconds[name] = time.perf_counter() - start

    methods = {
        "cross-entropy, shifted": (None, True),
        "live KD, shifted": (lambda: teacher, True),
        "cached views (V = 10)": (
            lambda: ksd.teachers.Cached(caches["views 10"], augment=shift),
            False,
        ),
        "cached views (V = 2)": (
            lambda: ksd.teachers.Cached(caches["views 2"], augment=shift),
            False,
        ),
        "cache without augmentation, no shifts": (
            lambda: ksd.teachers.Cached(caches["plain"]),
            False,
        ),
    }
    accuracy = {name: [] for name in methods}
    epoch_seconds = {name: [] for name in methods}
    for seed in range(args.seeds):
        keras.utils.set_random_seed(100 + seed)
        student = demo.student_model()
        for name, (make_teacher, shifted) in methods.items():
            keras.utils.set_random_seed(200 + seed)
            data = ksd.data.with_sample_ids(
                tf.data.Dataset.from_tensor_slices((x, y))
            ).shuffle(len(y), seed=seed)
            if shifted:
                data = data.map(_random_shift)
            copy = keras.models.clone_model(student)
            copy.set_weights(student.get_weights())
            terms = []
            if make_teacher is not None:
                terms = [
                    ksd.terms.Distillation(
                        make_teacher(), temperature=4.0, xi=0.9
                    )
                ]
            distiller = ksd.Distiller(copy, terms)
            distiller.compile("adam", _ce(), jit_compile=False)
            timer = _Epochs()
            distiller.fit(
                data.batch(64),
                epochs=args.epochs,
                verbose=0,
                callbacks=[timer],
            )
            logits = copy.predict(x_test, verbose=0)
            accuracy[name].append(
                100.0 * np.mean(np.argmax(logits, -1) == y_test)
            )
            epoch_seconds[name].extend(timer.times[1:])

    print(
        f"Teacher test accuracy {100 * teacher_accuracy:.2f}%; "
        f"{args.seeds} seeds, {args.epochs} epochs.\n"
    )
    print("| cache | writer s | teacher forwards |")
    print("|---|---|---|")
    for name, seconds in writer_seconds.items():
        views = {"plain": 1, "views 2": 2, "views 10": 10}[name]
        print(f"| {name} | {seconds:.1f} | {views * len(y):,} |")
    print()
    live = np.asarray(accuracy["live KD, shifted"])
    print("| method | test accuracy % | Δ vs live (paired) | median epoch s |")
    print("|---|---|---|---|")
    for name, values in accuracy.items():
        delta = (
            ""
            if name == "live KD, shifted"
            else _mean_error(np.asarray(values) - live)
        )
        print(
            f"| {name} | {_mean_error(values)} | {delta} | "
            f"{statistics.median(epoch_seconds[name]):.2f} |"
        )


if __name__ == "__main__":
    main()
