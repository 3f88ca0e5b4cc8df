"""Self-distillation: the student as its own teacher, on MNIST.

    python examples/self_distillation.py --method pskd
    python examples/self_distillation.py --method ema --label-noise 0.4
    python examples/self_distillation.py --method snapshot --data mnist
    python examples/self_distillation.py --method born_again

Methods: `pskd` (the student's predictions from the previous epoch),
`ema` (a moving average of the student, mean teacher), `snapshot` (votes of
the last 3 epoch snapshots), `born_again` (generations, each distilled from
the previous one, with the label weight estimated per generation).
`--label-noise` flips that fraction of training labels. The default data,
the MNIST digits bundled with the package, needs no network;
`--data fashion_mnist` reads Debian's `dataset-fashion-mnist` and
`--data mnist` downloads the full MNIST, failing at once when offline.
"""

import argparse
import os

import keras
import numpy as np
import tensorflow as tf

import keras_selfdistill as ksd


def load(source, limit, label_noise):
    (x, y), (x_test, y_test) = ksd.datasets.load(
        source, label_noise=label_noise, seed=0
    )
    if limit:
        x, y, x_test, y_test = (
            x[:limit],
            y[:limit],
            x_test[:limit],
            y_test[:limit],
        )
    return (x, y), (x_test, y_test)


def student_model():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ],
        name="student",
    )


def compile_model(model):
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            "accuracy",
            ksd.metrics.ExpectedCalibrationError(from_logits=True),
        ],
    )


def self_teacher_term(method, num_samples, epochs):
    if method == "pskd":
        # PS-KD: targets (1 − α_t)·y + α_t·p_prev, α_t = 0.8·(t + 1)/T.
        return ksd.recipes.ps_kd(num_samples, 10, epochs=epochs)
    if method == "ema":
        return ksd.terms.Distillation(
            ksd.teachers.EMA(momentum=0.99),
            weight=ksd.schedules.SigmoidRampUp(ramp_up_epochs=5),
        )
    return ksd.terms.Distillation(
        ksd.teachers.Snapshot(freq=1, keep=3, combine="vote"), xi=0.5
    )


def build_parser():
    """The command line, every option described."""
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--method",
        choices=["pskd", "ema", "snapshot", "born_again"],
        default="pskd",
        help="which self-teacher (default pskd)",
    )
    parser.add_argument(
        "--data",
        choices=ksd.datasets.sources.NAMES,
        default="bundled_mnist",
        help="bundled_mnist (offline, default), fashion_mnist (Debian "
        "files) or mnist (downloads)",
    )
    parser.add_argument(
        "--epochs", type=int, default=30, help="epochs (default 30)"
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
        help="where the student is saved (default outputs)",
    )
    parser.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        help="fraction of training labels flipped (default 0)",
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    keras.utils.set_random_seed(0)
    (x, y), (x_test, y_test) = load(args.data, args.limit, args.label_noise)

    if args.method == "born_again":
        held = np.random.default_rng(0).permutation(len(y))
        held, kept = held[: len(y) // 8], held[len(y) // 8 :]
        results = ksd.generations.fit_generations(
            student_model,
            x[kept],
            y[kept],
            generations=2,
            xi="estimate",
            validation_data=(x[held], y[held]),
            epochs=args.epochs,
            batch_size=64,
            verbose=0,
        )
        for index, result in enumerate(results):
            print(f"generation {index}: xi = {result['xi']}")
        student = results[-1]["student"]
        compile_model(student)
        model = student
    else:
        student = student_model()
        model = ksd.Distiller(
            student, [self_teacher_term(args.method, len(y), args.epochs)]
        )
        compile_model(model)
        train = ksd.data.with_sample_ids(
            tf.data.Dataset.from_tensor_slices((x, y))
        )
        train = train.shuffle(len(y), seed=0).batch(64)
        model.fit(
            train,
            epochs=args.epochs,
            verbose=2,
            callbacks=[
                keras.callbacks.BackupAndRestore(
                    os.path.join(args.output_dir, f"backup_{args.method}")
                )
            ],
        )
    result = model.evaluate(x_test, y_test, return_dict=True, verbose=0)
    print(
        f"{args.method}: test accuracy {result['accuracy']:.4f}, "
        f"ECE {result['expected_calibration_error']:.4f}"
    )
    path = os.path.join(args.output_dir, f"student_{args.method}.keras")
    student.save(path)
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
