"""Progressive distillation of a DDIM sampler: quality per step count.

For each seed: the example's base model (a 0.39 M-parameter v-prediction
UNet, continuous time, truncated-SNR weighting, EMA weights) is trained
on the 60,000 Fashion-MNIST training images, distilled in rounds
16 → 8 → 4 → 2 → 1 steps, and, as the equal-compute control, trained on
(from its EMA weights, at its final learning rate) for the wall time the
rounds took. Every sampler draws 1,000 images from the same fixed noise
per seed at each step count; FID and KID are measured on the 128
penultimate features of a CNN classifier trained on the same data against
the 10,000 test images, with the entropy of the samples' predicted
classes. Inception's ImageNet weights cannot be downloaded offline, so
these are not comparable with published FIDs.

    python benchmarks/progressive_distillation.py [--seeds 2]
        [--base-steps 3000] [--round-steps 650]
"""

import argparse
import importlib.util
import os
import pathlib
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_selfdistill as ksd  # noqa: E402

_EXAMPLE = (
    pathlib.Path(__file__).resolve().parents[1]
    / "examples"
    / "progressive_distillation.py"
)


def _example():
    spec = importlib.util.spec_from_file_location("example", _EXAMPLE)
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


def _mean_se(values, digits=2):
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    se = statistics.stdev(values) / len(values) ** 0.5
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--base-steps", type=int, default=3000)
    parser.add_argument("--round-steps", type=int, default=650)
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args(argv)
    example = _example()
    step_counts = [1, 2, 4, 8, 16]
    started = time.perf_counter()
    train, test, _, train_labels = example.load_images("fashion_mnist")
    classifier, embed = example.train_classifier(train, train_labels)
    accuracy = classifier.evaluate(
        test, example.load_images("fashion_mnist")[2], verbose=0
    )[1]
    reference, _ = embed.predict(test, batch_size=500, verbose=0)
    real = example.quality(train[-args.samples :], embed, reference)
    scores = {}
    timings = []
    for seed in range(args.seeds):
        noise = np.random.default_rng(1000 + seed).normal(
            size=(args.samples,) + train.shape[1:]
        )

        def measure(name, model, steps):
            samples = ksd.diffusion.sample(model, noise, steps)
            result = example.quality(samples, embed, reference)
            scores.setdefault((steps, name), []).append(result)
            print(seed, steps, name, result, flush=True)

        base, base_seconds = example.train_base(train, args.base_steps, seed)
        for steps in step_counts:
            measure("undistilled", base.student, steps)
        rounds, round_seconds = example.distil(
            base.student, train, 16, 1, args.round_steps, seed
        )
        for result in rounds:
            measure("distilled", result["student"], result["num_steps"])
        stop = _StopAfter(round_seconds)
        example._fit_steps(
            base,
            example._dataset(train, 128, seed + 100),
            10**6,
            callbacks=[stop],
        )
        for steps in step_counts:
            measure("control", base.student, steps)
        timings.append((base_seconds, round_seconds, stop.steps))
    print(
        f"\n{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Keras {keras.__version__} "
        f"({keras.backend.backend()}); {time.perf_counter() - started:.0f} "
        f"s wall; classifier test accuracy {accuracy:.4f}"
    )
    for seed, (base_s, round_s, control_steps) in enumerate(timings):
        print(
            f"seed {seed}: base {args.base_steps} steps in {base_s:.0f} s; "
            f"rounds 16→1, {args.round_steps} steps each, in {round_s:.0f} "
            f"s; control {control_steps} more base steps in the same time"
        )
    print(
        f"real images ({args.samples} training images): FID "
        f"{real['fid']:.2f}, KID {real['kid']:.4f}, class entropy "
        f"{real['class_entropy']:.3f}"
    )
    print("\n| steps | sampler | FID | KID | class entropy |")
    print("|---|---|---|---|---|")
    for steps in step_counts:
        for name in ("undistilled", "distilled", "control"):
            runs = scores.get((steps, name))
            if not runs:
                continue
            print(
                f"| {steps} | {name} | "
                f"{_mean_se([r['fid'] for r in runs])} | "
                f"{_mean_se([r['kid'] for r in runs], 4)} | "
                f"{_mean_se([r['class_entropy'] for r in runs])} |"
            )
    print("\n| steps | distilled FID ÷ undistilled FID (per seed) |")
    print("|---|---|")
    for steps in (1, 2, 4, 8):
        ratios = [
            d["fid"] / u["fid"]
            for d, u in zip(
                scores[(steps, "distilled")], scores[(steps, "undistilled")]
            )
        ]
        print(f"| {steps} | {', '.join(f'{r:.2f}' for r in ratios)} |")
    two = [r["fid"] for r in scores[(2, "distilled")]]
    eight = [r["fid"] for r in scores[(8, "undistilled")]]
    print(
        "\n2-step distilled FID vs 8-step undistilled, per seed: "
        + ", ".join(f"{a:.2f} vs {b:.2f}" for a, b in zip(two, eight))
    )


if __name__ == "__main__":
    main()
