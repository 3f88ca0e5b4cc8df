"""Epoch-time overhead of the Distiller, as ratios measured in one process.

Variants run interleaved (A B C ... A B C ...), one epoch each per round,
on the same data, batch size and initial weights, after one warm-up round
that traces every train and test function. Reported: the median of the
timed epochs per variant and its ratio to plain `student.fit`, and for
teacher KD also the ratio to its floor (student step + one teacher forward)
and to `keras.distillation.Distiller` with its correct `KLDivergence` loss.

    python benchmarks/overhead.py [--rounds 11] [--batch-size 64]
"""

import argparse
import os
import platform
import statistics
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


def _variants(student, teacher):
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

    return {
        "student.fit (plain)": plain(),
        "Distiller, no terms": no_terms(),
        "Distiller, teacher KD": teacher_kd(),
        "keras.distillation.Distiller (KLDivergence)": keras_kd(),
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
    keras.utils.set_random_seed(0)
    teacher = demo.teacher_model()
    teacher.compile("adam", _loss(), jit_compile=False)
    teacher.fit(train, epochs=1, verbose=0)
    student = demo.student_model()
    models = _variants(student, teacher)

    times = {name: [] for name in models}
    times["teacher forward alone"] = []
    eval_times = {name: [] for name in models}
    for round_index in range(args.rounds + 1):
        for name, model in models.items():
            seconds = _time_fit(model, train)
            evaluation = _time_call(lambda: model.evaluate(test, verbose=0))
            if round_index:
                times[name].append(seconds)
                eval_times[name].append(evaluation)
        seconds = _time_call(lambda: teacher.evaluate(train, verbose=0))
        if round_index:
            times["teacher forward alone"].append(seconds)

    median = {name: statistics.median(values) for name, values in times.items()}
    eval_median = {
        name: statistics.median(values) for name, values in eval_times.items()
    }
    plain = median["student.fit (plain)"]
    floor = plain + median["teacher forward alone"]
    print(_machine(args))
    print(
        "\n| variant | median epoch s | × plain fit | × KD floor | "
        "median evaluate s | × plain evaluate |"
    )
    print("|---|---|---|---|---|---|")
    for name, seconds in median.items():
        kd_floor = (
            f"{seconds / floor:.2f}"
            if "KD" in name or "distillation" in name
            else ""
        )
        evaluation = eval_median.get(name)
        eval_cells = (
            f"{evaluation:.3f} | "
            f"{evaluation / eval_median['student.fit (plain)']:.2f}"
            if evaluation is not None
            else " | "
        )
        print(
            f"| {name} | {seconds:.3f} | {seconds / plain:.2f} | "
            f"{kd_floor} | {eval_cells} |"
        )
    ours = median["Distiller, teacher KD"]
    theirs = median["keras.distillation.Distiller (KLDivergence)"]
    print(f"\nteacher KD vs keras.distillation.Distiller: {ours / theirs:.2f}×")
    return median


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
        f"{args.rounds} timed rounds after 1 warm-up; student MLP "
        "784-128-10, teacher CNN (the demo's models); evaluate on the same "
        "data; teacher forward alone = teacher.evaluate on it"
    )


if __name__ == "__main__":
    main()
