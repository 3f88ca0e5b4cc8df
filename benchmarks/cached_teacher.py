"""Cached teacher outputs against a live teacher: accuracy, time, bytes.

Three parts, each printing Markdown tables:

- `classification`: the demo pair on the bundled MNIST (the CNN teacher,
  the MLP student, 4,000 training images, no augmentation). The teacher is
  trained once; its outputs are cached dense, top-k and sampled; students
  train with cross-entropy, live KD and KD from each cache (`T = 4`,
  `ξ = 0.9`, Adam 1e-3) for the same epochs and seeds. Reports test
  accuracy (mean ± standard error), seconds per epoch, the writer's
  samples per second and the bytes per sample on disk.
- `sequence`: the language-model example's byte-level transformers on the
  standard library's sources, a fixed set of windows (the cache is keyed
  by window), forward-KL KD per token (`mean_with_sample_weight`) from
  the live teacher and from dense, top-k and sampled caches (independent
  and systematic draws), the same number of steps and seeds. Reports
  held-out perplexity and tokens per second.
- `bytes`: bytes per sample of each kind at vocabularies 10, 32k and 256k
  (one position per sample, a random linear teacher).

    python benchmarks/cached_teacher.py --part classification --seeds 3
    python benchmarks/cached_teacher.py --part sequence --seeds 3
    python benchmarks/cached_teacher.py --part bytes

`--methods` runs some of the methods only (`live` is always needed).
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _examples import load as _example  # noqa: E402

import keras_selfdistill as ksd  # noqa: E402
from keras_selfdistill import demo  # noqa: E402

# `sampled` draws independently (RS-KD), `systematic` evenly spaced.
METHODS = ("ce", "live", "dense", "top_k", "sampled", "systematic")


def _ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _mean_error(values, digits=2):
    values = np.asarray(values, "float64")
    error = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0
    return f"{values.mean():.{digits}f} ± {error:.{digits}f}"


# The example's measures of a cache's size and of an epoch.
_EXAMPLE = _example("cached_teacher")
_size = _EXAMPLE.folder_bytes
_Epochs = _EXAMPLE.EpochTimer


def _write(teacher, data, num_samples, kind, k, temperature, root, sampling):
    directory = os.path.join(root, f"{kind}_{k}_{sampling}")
    start = time.perf_counter()
    ksd.cache.write_teacher_outputs(
        teacher,
        data,
        directory,
        num_samples,
        kind=kind,
        k=k,
        temperature=temperature,
        verbose=0,
        sampling=sampling,
    )
    seconds = time.perf_counter() - start
    return directory, num_samples / seconds, _size(directory) / num_samples


def _write_all(args, teacher, ids, num_samples, temperature, unit):
    """The caches `args.methods` read, with the writer's rate and size."""
    root = tempfile.mkdtemp(prefix="cached_teacher_")
    caches = {}
    print(f"| cache | writer {unit}s/s | bytes per {unit} |")
    print("|---|---|---|")
    for method, kind, k, sampling in (
        ("dense", "dense", None, None),
        ("top_k", "top_k", args.top_k, None),
        ("sampled", "sampled", args.draws, None),
        ("systematic", "sampled", args.draws, "systematic"),
    ):
        if method not in args.methods:
            continue
        directory, rate, size = _write(
            teacher, ids, num_samples, kind, k, temperature, root, sampling
        )
        caches[method] = directory
        label = method if k is None else f"{method} (k = {k})"
        print(f"| {label} | {rate:,.0f} | {size:,.1f} |")
    return caches


def classification(args):
    (x, y), (x_test, y_test) = ksd.datasets.load_mnist()
    keras.utils.set_random_seed(100)
    teacher = demo.teacher_model()
    teacher.compile(keras.optimizers.Adam(1e-3), _ce(), metrics=["accuracy"])
    teacher.fit(x, y, epochs=args.teacher_epochs, batch_size=64, verbose=0)
    teacher_accuracy = teacher.evaluate(x_test, y_test, verbose=0)[1]
    ids = ksd.data.with_sample_ids(x)
    print(f"teacher test accuracy {100 * teacher_accuracy:.2f}%\n")
    caches = _write_all(args, teacher, ids, len(x), 4.0, "sample")
    methods = args.methods
    accuracy = {m: [] for m in methods}
    epoch = {m: [] for m in methods}
    for seed in range(args.seeds):
        for method in methods:
            keras.utils.set_random_seed(seed)
            student = demo.student_model()
            if method == "ce":
                terms = []
            else:
                source = (
                    teacher
                    if method == "live"
                    else ksd.teachers.Cached(caches[method])
                )
                terms = [
                    ksd.terms.Distillation(source, temperature=4.0, xi=0.9)
                ]
            distiller = ksd.Distiller(student, terms)
            distiller.compile(
                keras.optimizers.Adam(1e-3), _ce(), metrics=["accuracy"]
            )
            timer = _Epochs()
            distiller.fit(
                ids,
                y,
                epochs=args.epochs,
                batch_size=64,
                verbose=0,
                callbacks=[timer],
            )
            result = distiller.evaluate(
                x_test, y_test, verbose=0, return_dict=True
            )
            accuracy[method].append(100 * result["accuracy"])
            epoch[method].append(statistics.median(timer.times[1:]))
    print(
        f"\n{args.seeds} seeds, {args.epochs} epochs, batch 64, T = 4, "
        "xi = 0.9\n"
    )
    print("| method | test accuracy % | Δ vs live (paired) | median epoch s |")
    print("|---|---|---|---|")
    for method in methods:
        delta = np.asarray(accuracy[method]) - np.asarray(accuracy["live"])
        print(
            f"| {method} | {_mean_error(accuracy[method])} | "
            f"{_mean_error(delta) if method != 'live' else ''} | "
            f"{statistics.median(epoch[method]):.2f} |"
        )


def sequence(args):
    lm = _example("language_model")
    train, held_out = lm.corpus()
    x, y = lm.windows(train, args.length)
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(len(x), args.windows, replace=False))
    x, y = x[chosen], y[chosen]
    x_held, y_held = lm.windows(held_out, args.length)
    x_held, y_held = x_held[:2000], y_held[:2000]
    settings = argparse.Namespace(
        length=args.length,
        batch_size=32,
        teacher_steps=args.teacher_steps,
    )
    teacher = lm.train_teacher(settings, x, y)
    print(
        f"{len(x)} windows of {args.length} bytes; teacher held-out "
        f"perplexity {lm.perplexity(teacher, x_held, y_held)[0]:.3f}\n"
    )
    ids = ksd.data.with_sample_ids(x)
    caches = _write_all(args, teacher, ids, len(x), 1.0, "window")
    methods = args.methods
    perplexity = {m: [] for m in methods}
    speed = {m: [] for m in methods}
    for seed in range(args.seeds):
        order = np.random.default_rng(seed).integers(
            0, len(x), size=args.steps * 32
        )
        for method in methods:
            student = lm.transformer(args.length, 64, 1, 2, "student", seed)
            terms, loss = [], _ce()
            if method != "ce":
                source = (
                    teacher
                    if method == "live"
                    else ksd.teachers.Cached(caches[method])
                )
                terms, loss = (
                    [
                        ksd.terms.Distillation(
                            source,
                            loss="kl",
                            reduction="mean_with_sample_weight",
                        )
                    ],
                    None,
                )
            distiller = ksd.Distiller(student, terms)
            distiller.compile(keras.optimizers.Adam(1e-3), loss=loss)
            # A dataset, so that the cache is read batch by batch.
            batches = tf.data.Dataset.from_tensor_slices(
                ({key: value[order] for key, value in ids.items()}, y[order])
            ).batch(32)
            start = time.perf_counter()
            distiller.fit(batches, epochs=1, verbose=0)
            seconds = time.perf_counter() - start
            perplexity[method].append(lm.perplexity(student, x_held, y_held)[0])
            speed[method].append(order.size * args.length / seconds)
    print(
        f"\n{args.seeds} seeds, {args.steps} steps of 32 windows, Adam 1e-3, "
        "forward KL at T = 1\n"
    )
    compared = ["live"] + (["dense"] if "dense" in methods else [])
    print(
        "| method | held-out perplexity | "
        + " | ".join(f"Δ vs {c} (paired)" for c in compared)
        + " | tokens/s |"
    )
    print("|---" * (3 + len(compared)) + "|")
    for method in methods:
        deltas = [
            _mean_error(
                np.asarray(perplexity[method]) - np.asarray(perplexity[c]), 3
            )
            if method != c
            else ""
            for c in compared
        ]
        print(
            f"| {method} | {_mean_error(perplexity[method], 3)} | "
            + " | ".join(deltas)
            + f" | {statistics.median(speed[method]):,.0f} |"
        )


def sizes(args):
    print("| vocabulary | kind | bytes per sample |")
    print("|---|---|---|")
    root = tempfile.mkdtemp(prefix="cached_bytes_")
    for vocabulary in (10, 32768, 262144):
        keras.utils.set_random_seed(0)
        teacher = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(vocabulary)]
        )
        x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
        ids = ksd.data.with_sample_ids(x)
        for kind, k in (("dense", None), ("top_k", 32), ("sampled", 32)):
            if kind != "dense" and k > vocabulary:
                k = vocabulary
            directory, _, size = _write(
                teacher,
                ids,
                64,
                kind,
                k,
                1.0,
                os.path.join(root, str(vocabulary)),
                None,
            )
            label = kind if k is None else f"{kind} (k = {k})"
            print(f"| {vocabulary:,} | {label} | {size:,.1f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part",
        choices=("classification", "sequence", "bytes"),
        required=True,
        help="which measurement to run",
    )
    parser.add_argument("--seeds", type=int, default=3, help="student seeds")
    parser.add_argument(
        "--epochs", type=int, default=10, help="classification epochs"
    )
    parser.add_argument(
        "--teacher-epochs", type=int, default=5, help="classification teacher"
    )
    parser.add_argument("--top-k", type=int, default=3, help="top-k classes")
    parser.add_argument(
        "--draws", type=int, default=8, help="RS-KD draws per position"
    )
    parser.add_argument("--length", type=int, default=64, help="window size")
    parser.add_argument(
        "--windows", type=int, default=8000, help="cached windows"
    )
    parser.add_argument(
        "--steps", type=int, default=2000, help="sequence student steps"
    )
    parser.add_argument(
        "--teacher-steps", type=int, default=3000, help="sequence teacher"
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, of {','.join(METHODS)} (live is needed)",
    )
    args = parser.parse_args(argv)
    args.methods = tuple(args.methods.split(","))
    if "live" not in args.methods or set(args.methods) - set(METHODS):
        parser.error(f"--methods: live and any of {METHODS}")
    {"classification": classification, "sequence": sequence, "bytes": sizes}[
        args.part
    ](args)


if __name__ == "__main__":
    main()
