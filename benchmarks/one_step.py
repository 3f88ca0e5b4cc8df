"""One- and few-step samplers distilled from one teacher, at equal wall time.

Trains (or loads, `--teacher`) the progressive-distillation example's base
model on the 60,000 Fashion-MNIST training images, then, from that same
teacher, per seed:

- **PD**: progressive distillation 16 → 8 → 4 → 2 → 1 steps,
  `--round-steps` steps a round; its wall time is every other method's
  budget;
- **CD**: `ConsistencyDistillation` (18 noise levels, Heun teacher steps,
  EMA target at 0.95, L2), the student initialised from the teacher, Adam
  at `--cd-learning-rate`, for PD's wall time;
- **DMD2**: `DistributionMatching` (a fake score copied from the teacher,
  `--dmd-fake-updates` updates by its own Adam per generator update,
  Adam at `--dmd-learning-rate` for both), the generator initialised from
  the teacher, for PD's wall time, sampled as a consistency model at
  `σ_max = 80` (and re-noised for 2 and 4 steps);
- **reflow**: the teacher's 16-step DDIM sampler maps `--pairs` noises to
  images (inside the budget), then `Reflow` trains a one-step student,
  initialised from the teacher, for the rest of PD's wall time;
- **control**: the base model trained on for PD's wall time.

Each sampler draws `--samples` images from the same noise per seed at 1,
2 and 4 steps where it has them (the teacher also at 16): FID and KID on
the 128 penultimate features of a CNN classifier trained on the same
data, against the 10,000 test images, and the entropy of the samples'
predicted classes.

    python benchmarks/one_step.py [--seeds 2] [--base-steps 1500]
        [--round-steps 150] [--teacher base.keras]

One process per seed (`--seeds 1 --first-seed N`, each pinned to a core
with `taskset`) runs the seeds at once; `--table LOG...` then prints the
table of their logs.

Where TensorFlow is not installed (an accelerator machine with JAX
alone, `benchmarks/one_step_accelerator.sh`), run it with
`KERAS_BACKEND=jax` and `--data-dir` (the four Fashion-MNIST IDX files):
the pipelines are then NumPy batches (`keras.utils.PyDataset`) instead
of `tf.data`.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_selfdistill as ksd  # noqa: E402

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_STEPS = (1, 2, 4)
# The consistency sampler's noise levels for 1, 2 and 4 steps: σ_max, then
# levels of the 18-level training grid (the paper's 2-step CIFAR-10 CD
# evaluates at 80 and 0.821, between grid levels 11 and 12 of 18).
_CD_LEVELS = {1: (80.0,), 2: (80.0, 0.821), 4: (80.0, 10.0, 2.0, 0.5)}


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds
        self.steps = 0

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if time.perf_counter() - self.start >= self.seconds:
            self.model.stop_training = True


def _tensorflow():
    """TensorFlow, or None where it is not installed."""
    try:
        import tensorflow as tf
    except ImportError:
        return None
    return tf


class _Batches(keras.utils.PyDataset):
    """Shuffled batches of NumPy arrays, a new order each pass over them:
    the pipelines where TensorFlow is not installed."""

    def __init__(self, arrays, batch_size, seed, steps=10**9):
        super().__init__()
        self.arrays = arrays
        self.batch_size = batch_size
        self.seed = seed
        self.steps = steps
        self.per_pass = len(arrays[0]) // batch_size
        self.epoch = 0
        self.order = (None, None)

    def __len__(self):
        return self.steps

    def on_epoch_end(self):
        self.epoch += 1

    def __getitem__(self, index):
        index += self.epoch * self.steps
        step = index % self.per_pass
        done = index // self.per_pass
        if self.order[0] != done:
            rng = np.random.default_rng([self.seed, done])
            self.order = (done, rng.permutation(len(self.arrays[0])))
        rows = self.order[1][step * self.batch_size :][: self.batch_size]
        batch = tuple(array[rows] for array in self.arrays)
        return batch if len(batch) > 1 else batch[0]


class _Noise(keras.utils.PyDataset):
    """Fresh Gaussian batches, one seed each, where TensorFlow is not
    installed."""

    def __init__(self, shape, seed):
        super().__init__()
        self.shape = shape
        self.seed = seed

    def __len__(self):
        return 10**9

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, index])
        return rng.normal(size=self.shape).astype("float32")


def _copy(model):
    # A teacher's model is frozen in place (`FrozenModel`): a plain clone
    # of it would not train on TensorFlow.
    return ksd.diffusion.trainable_copy(model)


def _fit_for(distiller, data, seconds):
    stop = _StopAfter(seconds)
    distiller.fit(
        data,
        epochs=10**6,
        steps_per_epoch=100,
        shuffle=False,  # shuffled pipelines, or fresh noise (Keras warns)
        verbose=0,
        callbacks=[stop],
    )
    return stop.steps


def _mean_se(values, digits=2):
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    se = statistics.stdev(values) / len(values) ** 0.5
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="run seeds from this one (one process per seed, each pinned "
        "to a core, runs the seeds at once)",
    )
    parser.add_argument("--base-steps", type=int, default=1500)
    parser.add_argument("--round-steps", type=int, default=150)
    parser.add_argument("--cd-learning-rate", type=float, default=1e-4)
    parser.add_argument("--dmd-learning-rate", type=float, default=1e-4)
    parser.add_argument("--dmd-fake-updates", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--base-ema",
        type=float,
        default=0.995,
        help="the teacher's weight-average momentum (0.999, the "
        "progressive-distillation example's, keeps 5%% of the initial "
        "weights after 3,000 steps)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="a folder of the four Fashion-MNIST IDX files, read without "
        "tensorflow-datasets",
    )
    parser.add_argument(
        "--table",
        nargs="+",
        metavar="LOG",
        help="print the table of these runs' logs (one seed each) and exit",
    )
    args = parser.parse_args(argv)
    if args.table:
        print(_table(_read_logs(args.table)))
        return
    tf = _tensorflow()
    batch = args.batch_size
    example = _load(
        "example", _ROOT / "examples" / "progressive_distillation.py"
    )
    started = time.perf_counter()
    if args.data_dir or tf is None:
        (x, train_labels), (x_test, test_labels) = (
            ksd.datasets.load_fashion_mnist(path=args.data_dir)
        )
        train, test = x * 2 - 1, x_test * 2 - 1
    else:
        train, test, test_labels, train_labels = example.load_images(
            "fashion_mnist"
        )
    classifier, embed = example.train_classifier(train, train_labels)
    accuracy = classifier.evaluate(test, test_labels, verbose=0)[1]
    reference, _ = embed.predict(test, batch_size=500, verbose=0)
    if args.teacher and os.path.exists(args.teacher):
        teacher = keras.saving.load_model(args.teacher)
        base_seconds = float("nan")
    else:
        base, base_seconds = example.train_base(
            train,
            args.base_steps,
            0,
            batch_size=batch,
            data=None if tf else _Batches((train,), batch, 0),
            ema_momentum=args.base_ema,
        )
        teacher = base.student
        if args.teacher:
            teacher.save(args.teacher)
    scores, budgets = {}, []
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for seed in seeds:
        noise = np.random.default_rng(1000 + seed).normal(
            size=(args.samples,) + train.shape[1:]
        )

        def measure(name, steps, samples):
            result = example.quality(samples, embed, reference)
            result = {k: float(v) for k, v in result.items()}
            scores.setdefault((steps, name), []).append(result)
            row = dict(seed=seed, steps=steps, sampler=name, **result)
            print(json.dumps(row), flush=True)

        # And the teacher's 16 steps, the sampler every student learns.
        for steps in _STEPS + (16,):
            measure(
                "teacher", steps, ksd.diffusion.sample(teacher, noise, steps)
            )
        rounds, seconds = example.distil(
            teacher,
            train,
            16,
            1,
            args.round_steps,
            seed,
            batch_size=batch,
            data=None
            if tf
            else _Batches((train,), batch, seed, args.round_steps),
        )
        for result in rounds:
            if result["num_steps"] in _STEPS:
                measure(
                    "PD",
                    result["num_steps"],
                    ksd.diffusion.sample(
                        result["student"], noise, result["num_steps"]
                    ),
                )
        if tf:
            data = example._dataset(train, batch, seed + 100)
        else:
            data = _Batches((train,), batch, seed + 100)
        keras.utils.set_random_seed(seed)
        student = _copy(teacher)
        cd = ksd.Distiller(
            student, [ksd.terms.ConsistencyDistillation(teacher, seed=seed)]
        )
        cd.compile(
            optimizer=keras.optimizers.Adam(
                args.cd_learning_rate, global_clipnorm=1.0
            )
        )
        cd_steps = _fit_for(cd, data, seconds)
        for steps in _STEPS:
            measure(
                "CD",
                steps,
                ksd.diffusion.consistency_sample(
                    student, noise, _CD_LEVELS[steps], seed=seed
                ),
            )
        keras.utils.set_random_seed(seed)
        generator = _copy(teacher)
        dmd = ksd.Distiller(
            generator,
            [
                ksd.terms.DistributionMatching(
                    teacher,
                    fake_optimizer=keras.optimizers.Adam(
                        args.dmd_learning_rate, global_clipnorm=1.0
                    ),
                    fake_updates=args.dmd_fake_updates,
                    seed=seed,
                )
            ],
        )
        dmd.compile(
            optimizer=keras.optimizers.Adam(
                args.dmd_learning_rate, global_clipnorm=1.0
            )
        )
        # Fresh noise every step, as DMD2 draws it.
        if tf:
            shape = (batch,) + train.shape[1:]

            def draw(i, seed=seed):
                # A function, not a lambda: AutoGraph cannot parse a lambda
                # that spans lines, and warns.
                key = tf.stack([seed + 200, tf.cast(i, "int32")])
                return tf.random.stateless_normal(shape, key)

            latents = tf.data.Dataset.range(10**9).map(draw)
        else:
            latents = _Noise((batch,) + train.shape[1:], seed + 200)
        dmd_steps = _fit_for(dmd, latents, seconds)
        for steps in _STEPS:
            measure(
                "DMD2",
                steps,
                ksd.diffusion.consistency_sample(
                    generator,
                    noise,
                    _CD_LEVELS[steps],
                    sigma_min=0.0,
                    seed=seed,
                ),
            )
        start = time.perf_counter()
        pair_noise = (
            np.random.default_rng(seed)
            .normal(size=(args.pairs,) + train.shape[1:])
            .astype("float32")
        )
        pair_images = ksd.diffusion.sample(teacher, pair_noise, 16)
        pair_seconds = time.perf_counter() - start
        pair_batch = min(batch, args.pairs)
        if tf:
            pairs = (
                tf.data.Dataset.from_tensor_slices((pair_noise, pair_images))
                .shuffle(args.pairs, seed=seed)
                .batch(pair_batch, drop_remainder=True)
                .repeat()
            )
        else:
            pairs = _Batches((pair_noise, pair_images), pair_batch, seed)
        student = _copy(teacher)
        reflow = ksd.Distiller(student, [ksd.terms.Reflow()])
        reflow.compile(
            optimizer=keras.optimizers.Adam(2e-4, global_clipnorm=1.0)
        )
        reflow_steps = _fit_for(reflow, pairs, max(seconds - pair_seconds, 0))
        measure("reflow", 1, ksd.diffusion.sample(student, noise, 1))
        control = ksd.Distiller(
            _copy(teacher), [ksd.terms.Denoising(seed=seed)]
        )
        control.compile(
            optimizer=keras.optimizers.Adam(1e-4, global_clipnorm=1.0)
        )
        control_steps = _fit_for(control, data, seconds)
        for steps in _STEPS:
            measure(
                "control",
                steps,
                ksd.diffusion.sample(control.student, noise, steps),
            )
        budgets.append(
            (
                seconds,
                cd_steps,
                dmd_steps,
                pair_seconds,
                reflow_steps,
                control_steps,
            )
        )
    print(
        f"\n{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Keras {keras.__version__} "
        f"({keras.backend.backend()}); {time.perf_counter() - started:.0f} "
        f"s wall; classifier test accuracy {accuracy:.4f}; teacher: "
        f"{args.base_steps} steps in {base_seconds:.0f} s"
    )
    for seed, (
        budget,
        cd_steps,
        dmd_steps,
        pair_s,
        reflow_steps,
        control_steps,
    ) in zip(seeds, budgets):
        print(
            f"seed {seed}: PD 16→1 ({args.round_steps} steps a round) in "
            f"{budget:.0f} s; CD {cd_steps} steps; DMD2 {dmd_steps} steps; "
            f"reflow {pair_s:.0f} s "
            f"for {args.pairs} pairs, then {reflow_steps} steps; control "
            f"{control_steps} steps"
        )
    print()
    print(_table(scores))


def _table(scores):
    """The mean ± standard error table of `{(steps, sampler): [rows]}`."""
    lines = [
        "| steps | sampler | FID | KID | class entropy |",
        "|---|---|---|---|---|",
    ]
    for steps in sorted({steps for steps, _ in scores}):
        for name in ("teacher", "control", "PD", "CD", "DMD2", "reflow"):
            runs = scores.get((steps, name))
            if not runs:
                continue
            lines.append(
                f"| {steps} | {name} | "
                f"{_mean_se([r['fid'] for r in runs])} | "
                f"{_mean_se([r['kid'] for r in runs], 4)} | "
                f"{_mean_se([r['class_entropy'] for r in runs])} |"
            )
    return "\n".join(lines)


def _read_logs(paths):
    """The measurements that runs printed (one JSON line each)."""
    scores = {}
    for path in paths:
        with open(path) as file:
            for line in file:
                if line.startswith("{"):
                    row = json.loads(line)
                    key = (row["steps"], row["sampler"])
                    scores.setdefault(key, []).append(row)
    return scores


if __name__ == "__main__":
    main()
