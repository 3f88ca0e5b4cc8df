"""Search the distillation temperature and ξ with KerasTuner.

    pip install ".[tuning]"      # in a clone of the repository
    python examples/tuning.py --max-trials 8

A `Distiller` is a `keras.Model`, so it is a KerasTuner hypermodel as it
is: `build(hp)` picks the temperature `T` and the label weight `ξ` of a
teacher → student `Distillation`, and the tuner keeps the trial with the
best validation accuracy. Validation runs the student alone (no teacher),
so the objective measures the model that will be shipped. `--tuner
bayesian` searches with Bayesian optimisation (scikit-learn's Gaussian
process, which the `tuning` extra installs), the first half of BOSS (Yoo et
al., "Bayesian Optimization Meets Self-Distillation", ICCV 2023,
https://arxiv.org/abs/2304.12666); its second half, distilling from
models of earlier trials, is not done here.

The default data, the MNIST digits bundled with the package, needs no
network; the validation split is carved from the training set, and the
test set is used once, for the best student.
"""

import argparse
import os

import keras
import numpy as np

import keras_selfdistill as ksd
from keras_selfdistill import demo


def compile_model(model):
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy", ksd.metrics.ExpectedCalibrationError()],
    )


def hypermodel(teacher):
    """A `build(hp)` for KerasTuner: a Distiller with T and ξ searched."""

    def build(hp):
        temperature = hp.Choice("temperature", [1.0, 2.0, 4.0, 8.0])
        xi = hp.Float("xi", 0.1, 0.9, step=0.1)
        distiller = ksd.Distiller(
            demo.student_model(),
            [ksd.terms.Distillation(teacher, temperature=temperature, xi=xi)],
        )
        compile_model(distiller)
        return distiller

    return build


class TrialReport(keras.callbacks.Callback):
    """Prints each trial's temperature, ξ and best validation accuracy as
    it ends, so a long search shows its progress."""

    def __init__(self):
        super().__init__()
        self.trials = 0

    def on_train_begin(self, logs=None):
        self.best = float("-inf")

    def on_epoch_end(self, epoch, logs=None):
        self.best = max(self.best, (logs or {}).get("val_accuracy", self.best))

    def on_train_end(self, logs=None):
        self.trials += 1
        term = self.model.terms[0]
        print(
            f"trial {self.trials}: T={term.temperature:g} xi={term.xi:.1f} "
            f"best val_accuracy={self.best:.4f}",
            flush=True,
        )


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
        "--tuner",
        choices=["random", "bayesian"],
        default="random",
        help="random search (default) or Bayesian optimisation (needs "
        "scikit-learn)",
    )
    parser.add_argument(
        "--max-trials",
        type=int,
        default=8,
        help="hyperparameter settings tried (default 8)",
    )
    parser.add_argument(
        "--epochs", type=int, default=10, help="epochs per trial (default 10)"
    )
    parser.add_argument(
        "--teacher-epochs",
        type=int,
        default=5,
        help="teacher epochs (default 5)",
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
        help="where the tuner keeps its trials and the best student is "
        "saved (default outputs)",
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        import keras_tuner
    except ImportError as error:
        raise SystemExit(
            'This example needs KerasTuner: pip install ".[tuning]" in a '
            "clone of the repository"
        ) from error
    if args.tuner == "bayesian":
        try:
            import sklearn  # noqa: F401 (KerasTuner's Bayesian oracle)
        except ImportError as error:
            raise SystemExit(
                "--tuner bayesian needs scikit-learn: pip install "
                '".[tuning]" in a clone, or pip install scikit-learn'
            ) from error
    os.makedirs(args.output_dir, exist_ok=True)
    (x, y), (x_test, y_test) = ksd.datasets.load(args.data)
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
        x_test, y_test = x_test[: args.limit], y_test[: args.limit]
    order = np.random.default_rng(0).permutation(len(y))
    held, kept = order[: len(y) // 5], order[len(y) // 5 :]

    keras.utils.set_random_seed(0)
    teacher = demo.teacher_model()
    compile_model(teacher)
    print(f"training the teacher ({args.teacher_epochs} epochs)", flush=True)
    teacher.fit(
        x[kept], y[kept], epochs=args.teacher_epochs, batch_size=64, verbose=0
    )
    tuner_class = {
        "random": keras_tuner.RandomSearch,
        "bayesian": keras_tuner.BayesianOptimization,
    }[args.tuner]
    tuner = tuner_class(
        hypermodel(teacher),
        objective=keras_tuner.Objective("val_accuracy", direction="max"),
        max_trials=args.max_trials,
        seed=0,
        directory=args.output_dir,
        project_name="distillation_tuning",
        overwrite=True,
    )
    print(f"{args.tuner} search: {args.max_trials} trials", flush=True)
    tuner.search(
        x[kept],
        y[kept],
        validation_data=(x[held], y[held]),
        epochs=args.epochs,
        batch_size=64,
        verbose=0,
        callbacks=[TrialReport()],
    )
    best = tuner.get_best_hyperparameters(1)[0]
    print("trials (temperature, xi, best validation accuracy):")
    for trial in tuner.oracle.get_best_trials(args.max_trials):
        values = trial.hyperparameters.values
        print(
            f"  T={values['temperature']:g} xi={values['xi']:.1f} "
            f"val_accuracy={trial.score:.4f}"
        )
    distiller = tuner.hypermodel.build(best)
    distiller.fit(
        x[kept], y[kept], epochs=args.epochs, batch_size=64, verbose=0
    )
    result = distiller.evaluate(x_test, y_test, verbose=0, return_dict=True)
    print(
        f"best: T={best.get('temperature'):g} xi={best.get('xi'):.1f}; "
        f"test accuracy {result['accuracy']:.4f}, "
        f"ECE {result['expected_calibration_error']:.4f}"
    )
    distiller.student.save(os.path.join(args.output_dir, "tuned_student.keras"))
    return {
        "best": best.values,
        "trials": [
            t.hyperparameters.values
            for t in tuner.oracle.get_best_trials(args.max_trials)
        ],
        "test": result,
    }


if __name__ == "__main__":
    main()
