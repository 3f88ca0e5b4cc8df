"""Distil a CNN teacher into a small MLP student on MNIST.

By default, the 5,000 MNIST digits bundled with keras_selfdistill (no
network needed); the full Fashion-MNIST from Debian's
`dataset-fashion-mnist`, or the full MNIST downloaded by TensorFlow
Datasets (failing at once when offline):

    python examples/teacher_student.py
    python examples/teacher_student.py --data fashion_mnist
    python examples/teacher_student.py --data mnist

The student is trained with `model.fit` and standard callbacks, then saved as
a plain Keras model that loads without keras_selfdistill.
"""

import argparse
import os

import keras
import tensorflow as tf

import keras_selfdistill as ksd


def load(source, limit):
    (x, y), (x_test, y_test) = ksd.datasets.load(source)
    train = tf.data.Dataset.from_tensor_slices((x, y))
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test))
    if limit:
        train, test = train.take(limit), test.take(limit)
    train = train.shuffle(10_000, seed=0).batch(64).prefetch(tf.data.AUTOTUNE)
    return train, test.batch(256).prefetch(tf.data.AUTOTUNE)


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


def compile_model(model):
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            "accuracy",
            ksd.metrics.ExpectedCalibrationError(from_logits=True),
        ],
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
        "--epochs", type=int, default=20, help="student epochs (default 20)"
    )
    parser.add_argument(
        "--teacher-epochs",
        type=int,
        default=10,
        help="teacher epochs (default 10)",
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
        help="where the models are saved (default outputs)",
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    keras.utils.set_random_seed(0)
    train, test = load(args.data, args.limit)

    teacher = teacher_model()
    compile_model(teacher)
    teacher.fit(train, epochs=args.teacher_epochs, verbose=2)

    distiller = ksd.Distiller(
        student_model(),
        terms=[
            ksd.terms.Distillation(
                teacher,
                temperature=4.0,
                weight=ksd.schedules.LinearRampUp(ramp_up_epochs=2),
            )
        ],
    )
    compile_model(distiller)
    distiller.fit(
        train,
        validation_data=test,
        epochs=args.epochs,
        verbose=2,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy", patience=5, restore_best_weights=True
            ),
            keras.callbacks.BackupAndRestore(
                os.path.join(args.output_dir, "backup")
            ),
        ],
    )
    result = distiller.evaluate(test, return_dict=True, verbose=0)
    print(
        f"student: accuracy {result['accuracy']:.4f}, "
        f"ECE {result['expected_calibration_error']:.4f}"
    )
    path = os.path.join(args.output_dir, "student.keras")
    distiller.student.save(path)
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
