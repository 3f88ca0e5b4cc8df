"""What a `tf.data` map costs an epoch of the demo's student.

One epoch is the 4,000 bundled MNIST images in batches of 64 from a
cached `tf.data` pipeline; each variant is one `fit` of `--epochs` epochs,
timed per epoch from `on_epoch_begin` to `on_epoch_end`; the epochs after
the first of `--rounds` interleaved rounds give each variant's median and
minimum (the epoch without interference, BENCHMARKS.md), and the first
epochs (which hold the `fit`'s tracing) their median. Variants: plain
`student.fit` on images with ids; the same with one `map` that gathers a
row of a 4,000 × 10 table per id, and with that gather inside a
`tf.cond`; the Distiller without terms (its input checks are one `map`,
over the dataset's first pass); cached teacher KD (the step gathers the
rows) in the `fit` that hashes each sample's inputs in the first pass,
in a second `fit` on the same dataset object (the input checks alone in
the first pass), and in a third with `check_data=False`.
`--student cnn` trains the demo's CNN teacher architecture as the student
instead of the MLP: a step about ten times longer, against the same
pipeline stages.

    python benchmarks/pipeline_stages.py [--rounds 3] [--epochs 6]
        [--student mlp|cnn]

On JAX (`KERAS_BACKEND=jax`) every model is compiled with `jit`.
"""

import argparse
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from distiller_floor import JIT  # noqa: E402
from distiller_floor import _EpochTimer  # noqa: E402
from distiller_floor import _loss  # noqa: E402
from distiller_floor import demo_cache  # noqa: E402

import keras_selfdistill as ksd  # noqa: E402
from keras_selfdistill import demo  # noqa: E402


class OnImages(keras.Model):
    """The student on `(images, ids)` inputs, ignoring the ids."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def call(self, inputs):
        return self.student(inputs[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument(
        "--student",
        choices=("mlp", "cnn"),
        default="mlp",
        help="the demo's MLP student, or its CNN teacher's architecture",
    )
    args = parser.parse_args(argv)
    x, y, _, cache, student = demo_cache("stages_cache_")
    if args.student == "cnn":
        student = demo.teacher_model()
    table = tf.random.normal((len(x), 10))
    autotune = tf.data.AUTOTUNE

    def images_and_ids():
        ids = tf.range(len(x))
        data = tf.data.Dataset.from_tensor_slices(((x, ids), y))
        return data.batch(64).cache()

    def with_sample_ids():
        data = tf.data.Dataset.from_tensor_slices((x, y))
        return ksd.data.with_sample_ids(data).batch(64).cache()

    def gather(inputs, labels):
        images, ids = inputs
        return (images, tf.gather(table, ids)), labels

    def gather_in_cond(inputs, labels):
        images, ids = inputs
        rows = tf.cond(
            tf.reduce_min(ids) >= 0,
            lambda: tf.gather(table, ids),
            lambda: tf.zeros((tf.size(ids), 10)),
        )
        return (images, rows), labels

    def plain(data):
        model = OnImages(keras.models.clone_model(student))
        model.compile("adam", _loss(), jit_compile=JIT)
        return model, data

    def distiller(terms):
        model = ksd.Distiller(keras.models.clone_model(student), terms)
        model.compile("adam", _loss(), jit_compile=JIT)
        return model

    def cached_kd():
        teacher = ksd.teachers.Cached(cache)
        return [ksd.terms.Distillation(teacher, temperature=4.0, xi=0.9)]

    def epochs(model, data):
        timer = _EpochTimer()
        model.fit(data, epochs=args.epochs, verbose=0, callbacks=[timer])
        return timer.times

    names = (
        "plain `fit`, images and ids",
        "+ one `map` with a gather",
        "+ one `map` with a gather inside a `cond`",
        "Distiller, no terms (the checks' `map`, first pass)",
        "Distiller, cached KD, first `fit` (hashes the inputs, first pass)",
        "Distiller, cached KD, second `fit` (the checks only, first pass)",
        "Distiller, cached KD, second `fit`, `check_data=False`",
    )
    first = {name: [] for name in names}
    later = {name: [] for name in names}

    def record(name, times):
        first[name].append(times[0])
        later[name].extend(times[1:])

    for _ in range(args.rounds):
        for name, data in zip(
            names[:3],
            (
                images_and_ids(),
                images_and_ids().map(gather, num_parallel_calls=autotune),
                images_and_ids().map(
                    gather_in_cond, num_parallel_calls=autotune
                ),
            ),
        ):
            record(name, epochs(*plain(data)))
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(64).cache()
        record(names[3], epochs(distiller([]), data))
        model, data = distiller(cached_kd()), with_sample_ids()
        record(names[4], epochs(model, data))
        record(names[5], epochs(model, data))
        model.check_data = False
        record(names[6], epochs(model, data))
    base = statistics.median(later[names[0]])
    fastest = min(later[names[0]])
    first_base = statistics.median(first[names[0]])
    print(
        "| variant | epochs 2+: median ms | × plain (median) | min ms | "
        "× plain (min) | epoch 1: median ms | × plain |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in names:
        median, low = statistics.median(later[name]), min(later[name])
        first_median = statistics.median(first[name])
        print(
            f"| {name} | {1e3 * median:.1f} | {median / base:.2f} | "
            f"{1e3 * low:.1f} | {low / fastest:.2f} | "
            f"{1e3 * first_median:.0f} | {first_median / first_base:.2f} |"
        )


if __name__ == "__main__":
    main()
