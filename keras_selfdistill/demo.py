"""Teacher → student distillation on the bundled MNIST digits.

Trains a small CNN teacher, then the same MLP student without and with
distillation from it, over several seeds, and prints test accuracy,
expected calibration error, parameter count and training time. The last
distilled student is saved as a plain Keras model; with `--plot DIR`,
the last seed's training history and both students' reliability diagrams
are saved there as PNG files.

Run it with `python -m keras_selfdistill demo` (`--help` for options).
"""

import argparse
import math
import os
import time

import keras
import numpy as np

from keras_selfdistill import datasets
from keras_selfdistill import files
from keras_selfdistill import metrics
from keras_selfdistill import plots
from keras_selfdistill import terms
from keras_selfdistill.distiller import Distiller


def teacher_model():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(10),
        ],
        name="teacher",
    )


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


def blocks_model(name="blocks"):
    """A four-block CNN whose pooled blocks 1–3 carry auxiliary exits."""
    inputs = keras.Input((28, 28, 1))
    h = inputs
    for index, filters in enumerate((16, 32, 64), start=1):
        h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(
            h
        )
        h = keras.layers.MaxPooling2D(name=f"block{index}")(h)
    h = keras.layers.Conv2D(128, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D(name="block4")(h)
    return keras.Model(
        inputs, keras.layers.Dense(10, name="logits")(h), name=name
    )


def _compile(model):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            "accuracy",
            metrics.ExpectedCalibrationError(from_logits=True),
        ],
    )


def _train(model, x, y, x_test, y_test, epochs, batch_size):
    _compile(model)
    start = time.perf_counter()
    history = model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0)
    seconds = time.perf_counter() - start
    result = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    calibration = metrics.ExpectedCalibrationError(from_logits=True)
    calibration.update_state(y_test, model.predict(x_test, verbose=0))
    return {
        "accuracy": result["accuracy"],
        "ece": result["expected_calibration_error"],
        "seconds": seconds,
        "history": history,
        "calibration": calibration,
    }


PLOTS = {
    "history": "history_distilled.png",
    "cross-entropy": "reliability_cross_entropy.png",
    "distilled": "reliability_distilled.png",
}


def _plot_paths(folder, overwrite):
    """Checks, before training, that the plots can be drawn and written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(plots.INSTALL_HINT) from error
    os.makedirs(folder, exist_ok=True)
    paths = {k: os.path.join(folder, v) for k, v in PLOTS.items()}
    for path in paths.values():
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(
                f"{path} exists. Choose another --plot folder, remove it, "
                "or pass `overwrite=True` (`--overwrite`)."
            )
    return paths


def _save_plots(paths, last):
    plots.history(last["distilled"]["history"]).savefig(paths["history"])
    for variant in ("cross-entropy", "distilled"):
        plots.reliability_diagram(
            last[variant]["calibration"], title=f"Student, {variant}"
        ).savefig(paths[variant])
    for path in paths.values():
        print(f"Saved {path}")


def _mean_and_error(values):
    values = np.asarray(values, dtype="float64")
    if len(values) < 2:
        return values.mean(), float("nan")
    return values.mean(), values.std(ddof=1) / math.sqrt(len(values))


def _format(values, scale=1.0, digits=2):
    mean, error = _mean_and_error(np.asarray(values) * scale)
    if math.isnan(error):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {error:.{digits}f}"


def run(
    seeds=3,
    epochs=30,
    teacher_epochs=15,
    temperature=4.0,
    xi=0.9,
    output="distilled_student.keras",
    limit=None,
    overwrite=False,
    plot=None,
):
    """Runs the demo and returns its rows as a list of dicts."""
    # Before training, not after it.
    if output:
        files.check_writable(output, overwrite)
    plot_paths = _plot_paths(plot, overwrite) if plot else None
    (x, y), (x_test, y_test) = datasets.load_mnist()
    if limit:
        x, y, x_test, y_test = (
            x[:limit],
            y[:limit],
            x_test[:limit],
            y_test[:limit],
        )
    batch_size = 64
    keras.utils.set_random_seed(0)
    teacher = teacher_model()
    teacher_result = _train(
        teacher, x, y, x_test, y_test, teacher_epochs, batch_size
    )
    print(
        f"teacher: test accuracy {teacher_result['accuracy']:.4f} after "
        f"{teacher_epochs} epochs ({teacher_result['seconds']:.1f} s)"
    )
    results = {"cross-entropy": [], "distilled": []}
    last = {}
    student = None
    for seed in range(seeds):
        for variant in results:
            keras.utils.set_random_seed(seed)
            student = student_model()
            distiller = Distiller(
                student,
                terms=[
                    terms.Distillation(teacher, temperature=temperature, xi=xi)
                ]
                if variant == "distilled"
                else [],
            )
            result = _train(distiller, x, y, x_test, y_test, epochs, batch_size)
            results[variant].append(result)
            last[variant] = result
            print(
                f"seed {seed} {variant:>13}: accuracy "
                f"{result['accuracy']:.4f}, ECE {result['ece']:.4f}"
            )
    if output:
        files.save_model(student, output, overwrite=overwrite)
    rows = [
        {
            "model": "teacher (CNN)",
            "accuracy": [teacher_result["accuracy"]],
            "ece": [teacher_result["ece"]],
            "params": teacher.count_params(),
            "seconds": [teacher_result["seconds"]],
        }
    ]
    for variant, runs in results.items():
        rows.append(
            {
                "model": f"student, {variant}",
                "accuracy": [r["accuracy"] for r in runs],
                "ece": [r["ece"] for r in runs],
                "params": student.count_params(),
                "seconds": [r["seconds"] for r in runs],
            }
        )
    _print_table(rows, seeds, epochs, temperature, xi)
    gain = np.subtract(rows[2]["accuracy"], rows[1]["accuracy"])
    print(
        f"\nDistilled minus cross-entropy, test accuracy (paired by seed): "
        f"{_format(gain, 100)} points over {seeds} seed(s)."
    )
    if output:
        print(f"Saved the last distilled student to {output}")
    if plot_paths:
        _save_plots(plot_paths, last)
    return rows


def _print_table(rows, seeds, epochs, temperature, xi):
    print(
        f"\nMNIST (bundled 4,000 train / 1,000 test), student MLP trained "
        f"{epochs} epochs, mean ± SE over {seeds} seed(s); KD: T={temperature}"
        f", xi={xi}\n"
    )
    header = (
        f"{'model':<28}{'test accuracy %':>18}{'ECE %':>16}"
        f"{'params':>10}{'train s':>14}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['model']:<28}{_format(row['accuracy'], 100):>18}"
            f"{_format(row['ece'], 100):>16}{row['params']:>10,}"
            f"{_format(row['seconds'], 1, 1):>14}"
        )


def parser():
    """The demo's command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m keras_selfdistill demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="students trained per variant, paired by seed (default 3)",
    )
    parser.add_argument(
        "--epochs", type=int, default=30, help="student epochs (default 30)"
    )
    parser.add_argument(
        "--teacher-epochs",
        type=int,
        default=15,
        help="teacher epochs (default 15)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=4.0,
        help="distillation temperature T (default 4)",
    )
    parser.add_argument(
        "--xi",
        type=float,
        default=0.9,
        help="weight of the teacher's soft targets; the labels get 1 - xi "
        "(default 0.9)",
    )
    parser.add_argument(
        "--output",
        default="distilled_student.keras",
        help="where to save the last distilled student, a .keras file "
        "(default distilled_student.keras; '' to skip)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output file or plots",
    )
    parser.add_argument(
        "--plot",
        metavar="DIR",
        default=None,
        help="save the training history and reliability diagrams as PNG "
        "files in DIR (needs matplotlib: pip install "
        '"keras-selfdistill[plots]")',
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only the first N train and test images (smoke tests)",
    )
    return parser


def main(argv=None):
    args = parser().parse_args(argv)
    run(
        seeds=args.seeds,
        epochs=args.epochs,
        teacher_epochs=args.teacher_epochs,
        temperature=args.temperature,
        xi=args.xi,
        output=args.output,
        limit=args.limit,
        overwrite=args.overwrite,
        plot=args.plot,
    )
