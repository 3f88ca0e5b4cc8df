"""Prune a Fashion-MNIST ResNet, then recover it: none, CE, KD, scratch.

Per seed, the original (`fashion_recipe.student`, a ResNet of widths
16/32/64 with one basic block per stage) trains with the recipe's
optimiser (SGD, Nesterov, weight decay 5e-4, learning rate 0.1 cosine to
0) and augmentation for `--epochs`. Then, for each pruning ratio, the
channels of every group (residual groups included) are pruned by their
activation on 1,024 training images (`keras_selfdistill.pruning`) and:

- `none`: the pruned model, not trained;
- `ce`: fine-tuned with cross-entropy for `--recovery-epochs`;
- `kd`: distilled from the original for `--recovery-epochs`
  (`Distillation`, temperature 4, label weight ξ = 0.9), the same
  optimiser as `ce` (learning rate 0.01 cosine to 0);
- `scratch`: the pruned architecture, freshly initialised, trained with
  the original's recipe for `--epochs` + `--recovery-epochs` epochs: as
  many optimizer steps as the original's training and the recovery
  together.

Reported: test accuracy and ECE (15 bins), parameters and milliseconds
per batch of 128 at inference (median of 20 `predict_on_batch` calls),
mean ± standard error over seeds, and the paired differences kd − ce and
kd − scratch.

    python benchmarks/pruning.py --seeds 0 1 2
    python benchmarks/pruning.py --seeds 0 --epochs 1 --recovery-epochs 1 \\
        --train-size 2000                                 # a smoke run
"""

import argparse
import json
import os
import sys
import time

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fashion_recipe  # noqa: E402

import keras_selfdistill as ksd  # noqa: E402

METHODS = ("none", "ce", "kd", "scratch")


def _compile(model, steps, learning_rate):
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps)
    optimizer = keras.optimizers.SGD(
        schedule, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def _steps(size, epochs):
    return epochs * -(-size // fashion_recipe.BATCH)


def _evaluate(model, x_test, y_test):
    logits = model.predict(x_test, batch_size=500, verbose=0)
    ece = ksd.metrics.ExpectedCalibrationError(from_logits=True)
    ece.update_state(y_test, logits)
    batch = x_test[: fashion_recipe.BATCH]
    model.predict_on_batch(batch)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        model.predict_on_batch(batch)
        times.append(time.perf_counter() - start)
    return {
        "accuracy": float(np.mean(np.argmax(logits, -1) == y_test)),
        "ece": float(ece.result()),
        "params": int(model.count_params()),
        "ms_per_batch": 1000.0 * float(np.median(times)),
    }


def _fit(model, x, y, seed, epochs):
    data = fashion_recipe.dataset(x, y, seed)
    model.fit(data, epochs=epochs, verbose=0, shuffle=False)


def run_seed(args, seed, data):
    (x, y), (x_test, y_test) = data
    rows = []

    def record(method, ratio, model, seconds):
        row = dict(seed=seed, method=method, ratio=ratio, seconds=seconds)
        row.update(_evaluate(model, x_test, y_test))
        rows.append(row)
        print(json.dumps(row), flush=True)

    start = time.perf_counter()
    original = fashion_recipe.student(seed)
    _compile(original, _steps(len(y), args.epochs), 0.1)
    _fit(original, x, y, seed, args.epochs)
    record("original", 0.0, original, time.perf_counter() - start)
    original.trainable = False
    scores = ksd.pruning.activation(original, x[:1024], batch_size=256)
    recovery_steps = _steps(len(y), args.recovery_epochs)
    for ratio in args.ratios:
        pruned = ksd.pruning.prune(original, ratio, scores=scores)
        record("none", ratio, pruned, 0.0)

        start = time.perf_counter()
        tuned = ksd.pruning.prune(original, ratio, scores=scores)
        _compile(tuned, recovery_steps, 0.01)
        _fit(tuned, x, y, seed, args.recovery_epochs)
        record("ce", ratio, tuned, time.perf_counter() - start)

        start = time.perf_counter()
        student = ksd.pruning.prune(original, ratio, scores=scores)
        distiller = ksd.Distiller(
            student,
            [ksd.terms.Distillation(original, temperature=4.0, xi=0.9)],
        )
        _compile(distiller, recovery_steps, 0.01)
        _fit(distiller, x, y, seed, args.recovery_epochs)
        record("kd", ratio, student, time.perf_counter() - start)

        start = time.perf_counter()
        keras.utils.set_random_seed(seed + 1000)
        scratch = keras.Model.from_config(pruned.get_config())
        epochs = args.epochs + args.recovery_epochs
        _compile(scratch, _steps(len(y), epochs), 0.1)
        _fit(scratch, x, y, seed, epochs)
        record("scratch", ratio, scratch, time.perf_counter() - start)
    return rows


def read_logs(paths):
    """The rows of these JSON-lines logs."""
    rows = []
    for path in paths:
        with open(path) as file:
            rows += [json.loads(line) for line in file if line.strip()]
    return rows


def append_log(path, rows):
    with open(path, "a") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")


def mean_se(values):
    values = np.asarray(values, "float64")
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(
        values.std(ddof=1) / np.sqrt(len(values))
    )


def table(rows):
    lines = [
        "| ratio | method | accuracy % | ECE % | params | ms / batch |",
        "|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["ratio"], r["method"]) for r in rows})
    order = {m: i for i, m in enumerate(("original",) + METHODS)}
    keys.sort(key=lambda k: (k[0], order[k[1]]))
    for ratio, method in keys:
        chosen = [
            r for r in rows if (r["ratio"], r["method"]) == (ratio, method)
        ]
        accuracy = mean_se([100 * r["accuracy"] for r in chosen])
        ece = mean_se([100 * r["ece"] for r in chosen])
        lines.append(
            f"| {ratio:g} | {method} | {accuracy[0]:.2f} ± {accuracy[1]:.2f} "
            f"| {ece[0]:.2f} ± {ece[1]:.2f} | {chosen[0]['params']:,} "
            f"| {np.median([r['ms_per_batch'] for r in chosen]):.1f} |"
        )
    lines.append("")
    lines.append("Paired differences in accuracy (points, mean ± s.e.):")
    for ratio in sorted({r["ratio"] for r in rows if r["ratio"] > 0}):
        for baseline in ("ce", "scratch"):
            diffs = []
            for seed in sorted({r["seed"] for r in rows}):
                by = {
                    r["method"]: r["accuracy"]
                    for r in rows
                    if r["seed"] == seed and r["ratio"] == ratio
                }
                if "kd" in by and baseline in by:
                    diffs.append(100 * (by["kd"] - by[baseline]))
            mean, se = mean_se(diffs)
            lines.append(
                f"- ratio {ratio:g}: kd − {baseline} = {mean:+.2f} ± {se:.2f}"
                f" ({len(diffs)} seeds)"
            )
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--recovery-epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument(
        "--log", help="append each measurement here as a JSON line"
    )
    parser.add_argument(
        "--table",
        nargs="+",
        metavar="LOG",
        help="print the table of these logs and run nothing",
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.table:
        print(table(read_logs(args.table)))
        return
    (x, y), test = ksd.datasets.load_fashion_mnist()
    data = (x[: args.train_size], y[: args.train_size]), test
    rows = []
    for seed in args.seeds:
        seed_rows = run_seed(args, seed, data)
        rows += seed_rows
        if args.log:
            append_log(args.log, seed_rows)
    print(table(rows))


if __name__ == "__main__":
    main()
