"""Test accuracy and calibration of distillation against its controls.

On the bundled MNIST digits (4,000 train / 1,000 test), one CNN teacher is
trained once; then, for each seed, the demo's MLP student is trained with:

- cross-entropy at the same budget (`ce`),
- cross-entropy early-stopped on a 500-image validation split carved from
  the training set (`ce_early_stop`; it trains on the other 3,500),
- label smoothing 0.1 (`label_smoothing`),
- teacher KD from the CNN, `T=4`, `ξ=0.9` (`teacher_kd`),
- PS-KD: past predictions, `ξ` ramped linearly to 0.8 over all epochs
  (`pskd`),
- mean teacher: EMA of the student (momentum 0.99), weight ramped up over
  5 epochs (`ema`),
- born-again networks, 2 generations after generation 0, `ξ = 0.5`
  (`born_again`), and with `ξ` estimated per generation by the closed form
  on the 500-image held-out split (`born_again_estimated`; trains on 3,500).

Reported: mean ± standard error over seeds of test accuracy and of ECE
(15 bins), and of their paired (same seed) differences to `ce`.

    python benchmarks/accuracy.py [--seeds 5] [--epochs 30] [--label-noise 0]
"""

import argparse
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_selfdistill as ksd  # noqa: E402
from keras_selfdistill import demo  # noqa: E402

_BATCH = 64
_METHODS = (
    "ce",
    "ce_early_stop",
    "label_smoothing",
    "teacher_kd",
    "pskd",
    "ema",
    "born_again",
    "born_again_estimated",
)


def _compile(model, smoothing=0.0):
    if smoothing:
        loss = keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=smoothing
        )
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=loss,
        metrics=[
            "accuracy",
            ksd.metrics.ExpectedCalibrationError(from_logits=True),
        ],
    )


def _evaluate(model, x_test, y_test, one_hot=False):
    labels = keras.utils.to_categorical(y_test, 10) if one_hot else y_test
    result = model.evaluate(x_test, labels, verbose=0, return_dict=True)
    return result["accuracy"], result["expected_calibration_error"]


def _split(seed, size):
    order = np.random.default_rng(seed).permutation(size)
    return order[:500], order[500:]


def _self_term(method, size, epochs):
    steps = math.ceil(size / _BATCH)
    if method == "pskd":
        return ksd.recipes.ps_kd(size, 10, epochs=epochs)
    return ksd.terms.Distillation(
        ksd.teachers.EMA(momentum=0.99),
        weight=ksd.schedules.SigmoidRampUp(ramp_up_steps=5 * steps),
    )


def _born_again(data, seed, epochs, estimated):
    (x, y), (x_test, y_test) = data
    seeds = iter(range(seed * 100, seed * 100 + 100))

    def build():
        keras.utils.set_random_seed(next(seeds))
        return demo.student_model()

    kwargs = dict(epochs=epochs, batch_size=_BATCH, verbose=0)
    if estimated:
        held, kept = _split(seed, len(y))
        results = ksd.generations.fit_generations(
            build,
            x[kept],
            y[kept],
            generations=2,
            xi="estimate",
            validation_data=(x[held], y[held]),
            **kwargs,
        )
    else:
        results = ksd.generations.fit_generations(
            build, x, y, generations=2, xi=0.5, **kwargs
        )
    print(f"  xi per generation: {[r['xi'] for r in results[1:]]}")
    student = results[-1]["student"]
    _compile(student)
    return _evaluate(student, x_test, y_test)


def _run(method, teacher, data, seed, epochs):
    if method in ("born_again", "born_again_estimated"):
        return _born_again(data, seed, epochs, method == "born_again_estimated")
    (x, y), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    student = demo.student_model()
    if method == "teacher_kd":
        model = ksd.Distiller(
            student,
            [ksd.terms.Distillation(teacher, temperature=4.0, xi=0.9)],
        )
    elif method in ("pskd", "ema"):
        model = ksd.Distiller(student, [_self_term(method, len(y), epochs)])
    else:
        model = ksd.Distiller(student)
    one_hot = method == "label_smoothing"
    _compile(model, smoothing=0.1 if one_hot else 0.0)
    labels = keras.utils.to_categorical(y, 10) if one_hot else y
    inputs = ksd.data.with_sample_ids(x) if method == "pskd" else x
    if method == "ce_early_stop":
        held, kept = _split(seed, len(y))
        model.fit(
            x[kept],
            labels[kept],
            validation_data=(x[held], labels[held]),
            epochs=epochs,
            batch_size=_BATCH,
            verbose=0,
            callbacks=[
                keras.callbacks.EarlyStopping(
                    monitor="val_loss", patience=5, restore_best_weights=True
                )
            ],
        )
    else:
        model.fit(inputs, labels, epochs=epochs, batch_size=_BATCH, verbose=0)
    return _evaluate(model, x_test, y_test, one_hot)


def _summary(values):
    values = np.asarray(values, dtype="float64") * 100
    error = values.std(ddof=1) / math.sqrt(len(values))
    return f"{values.mean():.2f} ± {error:.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--label-noise", type=float, default=0.0)
    parser.add_argument("--methods", default=",".join(_METHODS))
    args = parser.parse_args(argv)

    data = ksd.datasets.load_mnist(label_noise=args.label_noise, seed=0)
    (x, y), (x_test, y_test) = data
    keras.utils.set_random_seed(0)
    teacher = demo.teacher_model()
    _compile(teacher)
    teacher.fit(x, y, epochs=args.teacher_epochs, batch_size=_BATCH, verbose=0)
    teacher_accuracy, teacher_ece = _evaluate(teacher, x_test, y_test)
    methods = args.methods.split(",")
    unknown = set(methods) - set(_METHODS)
    if unknown or "ce" not in methods:
        raise SystemExit(
            f"--methods: choose from {_METHODS} (with ce, the baseline); "
            f"unknown: {sorted(unknown)}"
        )
    results = {m: [] for m in methods}
    for seed in range(args.seeds):
        for method in methods:
            results[method].append(
                _run(method, teacher, data, seed, args.epochs)
            )
            accuracy, ece = results[method][-1]
            print(
                f"seed {seed} {method}: accuracy {accuracy:.4f} ECE {ece:.4f}"
            )
    print(
        f"\nteacher: accuracy {teacher_accuracy * 100:.2f}%, "
        f"ECE {teacher_ece * 100:.2f}%; label noise {args.label_noise}; "
        f"{args.seeds} seeds; {args.epochs} epochs\n"
    )
    print(
        "| method | test accuracy % | Δ accuracy vs ce (paired) | ECE % | "
        "Δ ECE vs ce (paired) |"
    )
    print("|---|---|---|---|---|")
    base = np.asarray(results["ce"])
    for method in methods:
        runs = np.asarray(results[method])
        print(
            f"| {method} | {_summary(runs[:, 0])} | "
            f"{_summary(runs[:, 0] - base[:, 0]) if method != 'ce' else ''} | "
            f"{_summary(runs[:, 1])} | "
            f"{_summary(runs[:, 1] - base[:, 1]) if method != 'ce' else ''} |"
        )
    return results


if __name__ == "__main__":
    main()
