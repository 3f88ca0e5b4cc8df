"""Epoch-time overhead of the Distiller, as ratios measured in one process.

Variants run interleaved (A B C ... A B C ...), one epoch each per round,
on the same data, batch size and initial weights, after one warm-up round
that traces every train and test function. Reported: the median of the
timed epochs per variant and its ratio to plain `student.fit`, to its floor
(the plain step, plus one teacher forward for teacher KD or one student
forward for the EMA and snapshot teachers, each measured as an `evaluate`
pass), and for teacher KD to `keras.distillation.Distiller` with its
correct `KLDivergence` loss. Cached teacher KD reads the teacher's outputs
from a dense cache written once before the rounds (its floor is plain fit:
no teacher runs); each timed epoch is its own `fit` call, so each pays the
cache's first-visit check of the inputs.

With `--student blocks`, also: feature distillation (block2 to a trained
copy's block2, no projector) against `keras.distillation.Distiller` with
its `FeatureDistillation` on the same pair, and two-view consistency (an
`Identity` strong view, so that only the library's work is timed) against
its floor, plain `student.fit` on batches of twice the size (two student
forwards and one backward per step).

    python benchmarks/overhead.py [--rounds 11] [--batch-size 64]
        [--student mlp|cnn|blocks]
"""

import argparse
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_selfdistill as ksd  # noqa: E402
from keras_selfdistill import demo  # noqa: E402


class _EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self.start


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _copy(model, name):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    clone.name = name
    return clone


def _variants(student, teacher, num_samples, twin=None, cache=None):
    def plain():
        model = _copy(student, "plain")
        model.compile("adam", _loss(), jit_compile=False)
        return model

    def no_terms():
        model = ksd.Distiller(_copy(student, "s_no_terms"))
        model.compile("adam", _loss(), jit_compile=False)
        return model

    def teacher_kd():
        model = ksd.Distiller(
            _copy(student, "s_kd"),
            [ksd.terms.Distillation(teacher, temperature=4.0, xi=0.9)],
        )
        model.compile("adam", _loss(), jit_compile=False)
        return model

    def cached_kd():
        model = ksd.Distiller(
            _copy(student, "s_cached"),
            [
                ksd.terms.Distillation(
                    ksd.teachers.Cached(cache), temperature=4.0, xi=0.9
                )
            ],
        )
        model.compile("adam", _loss(), jit_compile=False)
        return model

    def keras_kd():
        model = keras.distillation.Distiller(
            teacher=teacher,
            student=_copy(student, "s_keras"),
            distillation_losses=keras.distillation.LogitsDistillation(
                temperature=4.0, loss=keras.losses.KLDivergence()
            ),
            student_loss_weight=0.1,
        )
        model.compile(optimizer="adam", loss=_loss(), jit_compile=False)
        return model

    def self_teacher(teacher, name):
        model = ksd.Distiller(
            _copy(student, name), [ksd.terms.Distillation(teacher, xi=0.5)]
        )
        model.compile("adam", _loss(), jit_compile=False)
        return model

    def exits(head):
        model = ksd.Distiller(
            _copy(student, f"s_exits_{head}"),
            [
                ksd.terms.AuxiliaryExits(
                    ["block1", "block2", "block3"], head=head
                )
            ],
        )
        model.compile("adam", _loss(), jit_compile=False)
        return model

    # name: (model, uses sample ids, what one extra forward the floor adds)
    variants = {
        "student.fit (plain)": (plain(), False, None),
        "Distiller, no terms": (no_terms(), False, None),
        "Distiller, teacher KD": (teacher_kd(), False, "teacher"),
        "Distiller, cached teacher KD (dense)": (cached_kd(), True, None),
        "keras.distillation.Distiller (KLDivergence)": (
            keras_kd(),
            False,
            "teacher",
        ),
        "Distiller, PS-KD (PastPredictions)": (
            self_teacher(
                ksd.teachers.PastPredictions(num_samples, 10), "s_pskd"
            ),
            True,
            None,
        ),
        "Distiller, EMA teacher": (
            self_teacher(ksd.teachers.EMA(0.99), "s_ema"),
            False,
            "student",
        ),
        "Distiller, Snapshot (keep 1)": (
            self_teacher(ksd.teachers.Snapshot(), "s_snapshot"),
            False,
            "student",
        ),
    }
    if student.name == "blocks":
        for head in ("linear", "bottleneck"):
            variants[f"Distiller, 3 auxiliary exits ({head} heads)"] = (
                exits(head),
                False,
                None,
            )
        variants.update(_feature_and_consistency_variants(student, twin))
    return variants


def _feature_and_consistency_variants(student, twin):
    ours = ksd.Distiller(
        _copy(student, "s_features"),
        [ksd.terms.FeatureDistillation(twin, "block2", projector=None, xi=0.5)],
    )
    ours.compile("adam", _loss(), jit_compile=False)
    theirs = keras.distillation.Distiller(
        teacher=twin,
        student=_copy(student, "s_keras_features"),
        distillation_losses=keras.distillation.FeatureDistillation(
            teacher_layer_name="block2", student_layer_name="block2"
        ),
        student_loss_weight=0.5,
    )
    theirs.compile(optimizer="adam", loss=_loss(), jit_compile=False)
    consistency = ksd.Distiller(
        _copy(student, "s_consistency"),
        [ksd.terms.Consistency(keras.layers.Identity())],
    )
    consistency.compile("adam", _loss(), jit_compile=False)
    doubled = _copy(student, "doubled")
    doubled.compile("adam", _loss(), jit_compile=False)
    return {
        "Distiller, feature distillation": (ours, False, "teacher"),
        "keras.distillation.Distiller (FeatureDistillation)": (
            theirs,
            False,
            "teacher",
        ),
        "Distiller, consistency (two views)": (consistency, False, None),
        "student.fit on doubled batches (consistency floor)": (
            doubled,
            "doubled",
            None,
        ),
    }


def _time_fit(model, dataset):
    timer = _EpochTimer()
    model.fit(dataset, epochs=1, verbose=0, callbacks=[timer])
    return timer.seconds


def _time_call(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--student",
        choices=["mlp", "cnn", "blocks"],
        default="mlp",
        help="the demo's MLP student (0.9 ms steps here), its CNN, or the "
        "four-block CNN `demo.blocks_model()` (adds the auxiliary-exit rows)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=4,
        help="passes over the 4,000 images per timed epoch",
    )
    args = parser.parse_args(argv)

    (x, y), (x_test, y_test) = ksd.datasets.load_mnist()
    train = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(args.batch_size)
        .cache()
        .repeat(args.repeat)
    )
    test = train
    train_ids = (
        ksd.data.with_sample_ids(tf.data.Dataset.from_tensor_slices((x, y)))
        .batch(args.batch_size)
        .cache()
        .repeat(args.repeat)
    )
    keras.utils.set_random_seed(0)
    teacher = demo.teacher_model()
    teacher.compile("adam", _loss(), jit_compile=False)
    teacher.fit(train, epochs=1, verbose=0)
    student = {
        "mlp": demo.student_model,
        "cnn": demo.teacher_model,
        "blocks": demo.blocks_model,
    }[args.student]()
    twin = None
    if args.student == "blocks":
        twin = demo.blocks_model(name="twin")
        twin.compile("adam", _loss(), jit_compile=False)
        twin.fit(train, epochs=1, verbose=0)
    # The teacher's outputs, written once (dense float16 log-probabilities).
    cache = tempfile.mkdtemp(prefix="overhead_cache_")
    ksd.cache.write_teacher_outputs(
        teacher, ksd.data.with_sample_ids(x), cache, len(y), verbose=0
    )
    variants = _variants(student, teacher, len(y), twin, cache)
    doubled = train.map(
        lambda x, y: (tf.concat([x, x], 0), tf.concat([y, y], 0))
    )
    forward = _copy(student, "forward")
    forward.compile(loss=_loss(), jit_compile=False)

    times = {name: [] for name in variants}
    eval_times = {name: [] for name in variants}
    forwards = {"teacher": [], "student": []}
    progress = keras.utils.Progbar(args.rounds + 1, unit_name="round")
    for round_index in range(args.rounds + 1):
        for name, (model, ids, _) in variants.items():
            data = {True: train_ids, False: train, "doubled": doubled}[ids]
            seconds = _time_fit(model, data)
            evaluation = _time_call(lambda: model.evaluate(test, verbose=0))
            if round_index:
                times[name].append(seconds)
                eval_times[name].append(evaluation)
        for key, model in (("teacher", teacher), ("student", forward)):
            seconds = _time_call(lambda: model.evaluate(train, verbose=0))
            if round_index:
                forwards[key].append(seconds)
        progress.add(1)

    median = {name: statistics.median(v) for name, v in times.items()}
    eval_median = {name: statistics.median(v) for name, v in eval_times.items()}
    forward_median = {k: statistics.median(v) for k, v in forwards.items()}
    plain = median["student.fit (plain)"]
    plain_eval = eval_median["student.fit (plain)"]
    print(_machine(args))
    print(
        "\n| variant | median epoch s | × plain fit | × floor (floor) | "
        "median evaluate s | × plain evaluate |"
    )
    print("|---|---|---|---|---|---|")
    for name, (_, _, extra) in variants.items():
        seconds = median[name]
        floor = plain + (forward_median[extra] if extra else 0.0)
        label = f"plain + {extra} forward" if extra else "plain fit"
        print(
            f"| {name} | {seconds:.3f} | {seconds / plain:.2f} | "
            f"{seconds / floor:.2f} ({label}) | {eval_median[name]:.3f} | "
            f"{eval_median[name] / plain_eval:.2f} |"
        )
    print(
        f"| teacher forward alone (teacher.evaluate) | "
        f"{forward_median['teacher']:.3f} | "
        f"{forward_median['teacher'] / plain:.2f} | | | |"
    )
    print(
        f"| student forward alone (student.evaluate) | "
        f"{forward_median['student']:.3f} | "
        f"{forward_median['student'] / plain:.2f} | | | |"
    )
    ours = median["Distiller, teacher KD"]
    theirs = median["keras.distillation.Distiller (KLDivergence)"]
    print(f"\nteacher KD vs keras.distillation.Distiller: {ours / theirs:.2f}×")
    if args.student == "blocks":
        ours = median["Distiller, feature distillation"]
        theirs = median["keras.distillation.Distiller (FeatureDistillation)"]
        print(
            "feature distillation vs keras.distillation.Distiller: "
            f"{ours / theirs:.2f}×"
        )
        ours = median["Distiller, consistency (two views)"]
        floor = median["student.fit on doubled batches (consistency floor)"]
        print(f"consistency vs its floor: {ours / floor:.2f}×")
    return median


_STUDENTS = {
    "mlp": "MLP 784-128-10",
    "cnn": "CNN (225k)",
    "blocks": "four-block CNN (98k)",
}


def _machine(args):
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores, {cpu}; TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}; jit_compile=False; epoch = "
        f"{args.repeat} × 4,000 MNIST images, batch {args.batch_size}; "
        f"{args.rounds} timed rounds after 1 warm-up; student "
        f"{_STUDENTS[args.student]}, "
        "teacher CNN (the demo's models); evaluate on the same data"
    )


if __name__ == "__main__":
    main()
