"""Auxiliary exits (BYOT) against plain cross-entropy, and early exits.

On the bundled MNIST digits (4,000 train / 1,000 test), for each seed the
four-block CNN `demo.blocks_model()` is trained from the same initial
weights with:

- cross-entropy (`ce`),
- BYOT: `AuxiliaryExits(["block1", "block2", "block3"])`, bottleneck heads,
  `α = 0.5`, `T = 3` (`byot`).

Reported: mean ± SE over seeds of the final head's test accuracy, the
paired difference to `ce`, and each exit's test accuracy. Then, for the
last seed's BYOT model, `EarlyExit` at several thresholds: test accuracy,
mean exit depth (0 = block1, 3 = the student's own output) and measured
latency per sample against the full student, both run as compiled
functions at the same batch size (median of `--repeats` passes over the
test set).

    python benchmarks/exits.py [--seeds 3] [--epochs 15] [--batch-size 1]
"""

import argparse
import math
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_selfdistill as ksd  # noqa: E402
from keras_selfdistill import demo  # noqa: E402

_EXITS = ["block1", "block2", "block3"]
_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _train(method, seed, data, epochs):
    (x, y), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    student = demo.blocks_model()
    terms = []
    if method == "byot":
        terms = [ksd.terms.AuxiliaryExits(_EXITS, head="bottleneck")]
    distiller = ksd.Distiller(student, terms)
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=_loss(),
        metrics=["accuracy"],
    )
    keras.utils.set_random_seed(seed)
    distiller.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    logs = distiller.evaluate(x_test, y_test, verbose=0, return_dict=True)
    return distiller, logs


def _summary(values):
    mean = float(np.mean(values))
    if len(values) < 2:
        return f"{100 * mean:.2f}"
    se = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return f"{100 * mean:.2f} ± {100 * se:.2f}"


def _time(function, batches, repeats):
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            function(batch)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    data = ksd.datasets.load_mnist()
    (_, _), (x_test, y_test) = data
    results = {"ce": [], "byot": []}
    exit_accuracy = {name: [] for name in _EXITS}
    distiller = None
    progress = keras.utils.Progbar(args.seeds * len(results), unit_name="run")
    for seed in range(args.seeds):
        for method in results:
            model, logs = _train(method, seed, data, args.epochs)
            progress.add(1, [("accuracy", logs["accuracy"])])
            results[method].append(logs["accuracy"])
            if method == "byot":
                distiller = model
                for name in _EXITS:
                    exit_accuracy[name].append(logs[f"{name}_accuracy"])
    print(
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, keras {keras.__version__}, "
        f"tensorflow {tf.__version__}; {args.seeds} seeds, "
        f"{args.epochs} epochs\n"
    )
    print("| model | test accuracy % | paired Δ vs ce |")
    print("|---|---|---|")
    final_ce, final_byot = np.array(results["ce"]), np.array(results["byot"])
    print(f"| ce, final head | {_summary(final_ce)} | |")
    print(
        f"| byot, final head | {_summary(final_byot)} | "
        f"{_summary(final_byot - final_ce)} |"
    )
    for name in _EXITS:
        ratio = np.array(exit_accuracy[name]) / final_byot
        print(
            f"| byot, exit {name} | {_summary(exit_accuracy[name])} | "
            f"{100 * ratio.mean():.1f}% of its final head |"
        )

    batches = [
        x_test[i : i + args.batch_size]
        for i in range(0, len(x_test), args.batch_size)
    ]
    student = distiller.student
    full = tf.function(
        lambda x: student(x, training=False), reduce_retracing=True
    )
    early_exits = {
        t: ksd.exits.EarlyExit(distiller.exits, t) for t in _THRESHOLDS
    }
    # Warm-up: trace every function on every batch shape.
    _time(full, batches[:2] + batches[-1:], 1)
    for early in early_exits.values():
        _time(early, batches[:2] + batches[-1:], 1)
    full_logits = student.predict(x_test, verbose=0)
    full_accuracy = float(np.mean(np.argmax(full_logits, -1) == y_test))
    rows = []
    for _ in range(args.repeats):
        # Interleaved, so drifts in machine speed hit every row alike.
        rows.append(
            [_time(full, batches, 1)]
            + [_time(e, batches, 1) for e in early_exits.values()]
        )
    medians = [statistics.median(column) for column in zip(*rows)]
    per_sample = 1e3 / len(x_test)
    print(
        f"\nEarly exit, batch size {args.batch_size}, median of "
        f"{args.repeats} passes over the 1,000 test images:\n"
    )
    print(
        "| threshold | test accuracy % | mean exit depth | "
        "exits taken (b1/b2/b3/final) | latency ms/sample | × full |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| full student | {100 * full_accuracy:.2f} | 3.00 | | "
        f"{medians[0] * per_sample:.3f} | 1.00 |"
    )
    for (threshold, early), seconds in zip(early_exits.items(), medians[1:]):
        logits, which = early(x_test)
        accuracy = float(np.mean(np.argmax(logits, -1) == y_test))
        counts = "/".join(str(c) for c in np.bincount(which, minlength=4))
        print(
            f"| {threshold} | {100 * accuracy:.2f} | {which.mean():.2f} | "
            f"{counts} | {seconds * per_sample:.3f} | "
            f"{seconds / medians[0]:.2f} |"
        )


if __name__ == "__main__":
    main()
