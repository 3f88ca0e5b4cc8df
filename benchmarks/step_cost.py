"""The cost of one training step, without the input pipeline (TensorFlow).

Times Keras's train function (`make_train_function`, one step per call)
of the demo's MLP student on one fixed batch of 64 bundled MNIST images,
repeated by a `tf.data` iterator, interleaved in `--rounds` rounds of
`--steps` calls: plain `student.fit`'s step, the
same with a hand-written KD loss (`0.1 · CE + 0.9 · T² · KL`, `T = 4`, the
teacher's log-probabilities carried in the labels), the Distiller without
terms, and the Distiller with `Distillation(Cached(...), T = 4, ξ = 0.9)`
on a dense cache. Reports the median milliseconds per step and the extra
over plain, which is what the step adds whatever feeds it.

    python benchmarks/step_cost.py [--rounds 15] [--steps 300]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from distiller_floor import _hand_written_kd  # noqa: E402
from distiller_floor import demo_cache  # noqa: E402

import keras_selfdistill as ksd  # noqa: E402


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    if keras.backend.backend() != "tensorflow":
        raise SystemExit("step_cost.py times TensorFlow functions.")
    # TensorFlow warns when five models' train functions are traced, as
    # this script does on purpose.
    tf.get_logger().setLevel("ERROR")
    x, y, teacher, cache, student = demo_cache("step_cache_")

    def copy(loss=None):
        clone = keras.models.clone_model(student)
        clone.set_weights(student.get_weights())
        clone.compile("adam", loss or _loss(), jit_compile=False)
        return clone

    def distiller(terms):
        model = ksd.Distiller(copy(), terms, check_data=False)
        model.compile("adam", _loss(), jit_compile=False)
        return model

    batch = (tf.constant(x[:64]), tf.constant(y[:64]))
    log_probs = keras.ops.log_softmax(teacher(x[:64]))
    labels_kd = tf.concat(
        [tf.cast(y[:64, None], "float32"), tf.cast(log_probs, "float32")], 1
    )
    cached = distiller(
        [
            ksd.terms.Distillation(
                ksd.teachers.Cached(cache), temperature=4.0, xi=0.9
            )
        ]
    )
    samples = {k: v[:64] for k, v in ksd.data.with_sample_ids(x).items()}
    joined = ksd.teachers.cached.join(cached.teachers, samples)
    variants = {
        "plain `student.fit` step": (copy(), batch),
        "plain step, hand-written KD loss": (
            copy(_hand_written_kd),
            (batch[0], labels_kd),
        ),
        "Distiller, no terms": (distiller([]), batch),
        "Distiller, no terms, on the cached batch": (
            distiller([]),
            (tf.nest.map_structure(tf.constant, joined), batch[1]),
        ),
        "Distiller, cached KD": (
            cached,
            (tf.nest.map_structure(tf.constant, joined), batch[1]),
        ),
    }
    steps = {}
    for name, (model, data) in variants.items():
        # Keras's own train function, fed by an iterator that repeats the
        # batch: the step as `fit` runs it, without the pipeline's work.
        model.make_train_function()
        function = model.train_function
        iterator = iter(tf.data.Dataset.from_tensors(data).repeat())
        steps[name] = lambda f=function, i=iterator: f(i)
        steps[name]()
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            seconds = time.perf_counter() - start
            times[name].append(seconds / args.steps * 1e3)
    plain = statistics.median(times["plain `student.fit` step"])
    print("| variant | median ms per step | extra over plain, ms | × plain |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"| {name} | {median:.3f} | {median - plain:+.3f} | "
            f"{median / plain:.2f} |"
        )


if __name__ == "__main__":
    main()
