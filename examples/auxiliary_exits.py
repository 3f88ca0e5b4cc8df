"""Auxiliary exits on MNIST: Be Your Own Teacher, then early-exit inference.

    python examples/auxiliary_exits.py
    python examples/auxiliary_exits.py --data fashion_mnist --head linear

A four-block CNN gets a classifier head after blocks 1–3. Each head learns
from the labels and from the network's own final output (BYOT); the
progress bar shows every exit's accuracy. After training, the plain
student and each exit are saved as standalone `.keras` files, and
`EarlyExit` answers each test image from the first exit that is confident
enough.
"""

import argparse
import os

import keras
import numpy as np

import keras_selfdistill as ksd

EXITS = ["block1", "block2", "block3"]


def load(source, limit):
    (x, y), (x_test, y_test) = ksd.datasets.load(source)
    if limit:
        x, y, x_test, y_test = (
            x[:limit],
            y[:limit],
            x_test[:limit],
            y_test[:limit],
        )
    return (x, y), (x_test, y_test)


def student_model():
    inputs = keras.Input((28, 28, 1))
    h = inputs
    for index, filters in enumerate((16, 32, 64), start=1):
        h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(
            h
        )
        h = keras.layers.MaxPooling2D(name=f"block{index}")(h)
    h = keras.layers.Conv2D(128, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D(name="block4")(h)
    logits = keras.layers.Dense(10, name="logits")(h)
    return keras.Model(inputs, logits, name="student")


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
        "--head",
        choices=["bottleneck", "linear"],
        default="bottleneck",
        help="exit head: BYOT's bottleneck or pooling + Dense (default "
        "bottleneck)",
    )
    parser.add_argument(
        "--epochs", type=int, default=15, help="epochs (default 15)"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.99,
        help="softmax confidence at which an exit answers (default 0.99)",
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
    (x, y), (x_test, y_test) = load(args.data, args.limit)

    student = student_model()
    distiller = ksd.Distiller(
        student,
        [ksd.terms.AuxiliaryExits(EXITS, xi=0.5, head=args.head)],
    )
    distiller.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    distiller.fit(
        x,
        y,
        batch_size=64,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        verbose=2,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy", patience=3, restore_best_weights=True
            )
        ],
    )
    result = distiller.evaluate(x_test, y_test, return_dict=True, verbose=0)
    for name in EXITS:
        print(f"exit {name}: test accuracy {result[name + '_accuracy']:.4f}")
    print(f"final head: test accuracy {result['accuracy']:.4f}")

    student.save(os.path.join(args.output_dir, "student.keras"))
    for name in EXITS:
        distiller.exits.export(name).save(
            os.path.join(args.output_dir, f"exit_{name}.keras")
        )

    early = ksd.exits.EarlyExit(distiller.exits, threshold=args.threshold)
    logits, which = early(x_test)
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == y_test))
    taken = np.bincount(which, minlength=len(EXITS) + 1)
    print(
        f"early exit at {args.threshold}: test accuracy {accuracy:.4f}, "
        f"answers per exit {dict(zip(EXITS + ['final'], taken.tolist()))}"
    )
    result["early_exit_accuracy"] = accuracy
    return result


if __name__ == "__main__":
    main()
