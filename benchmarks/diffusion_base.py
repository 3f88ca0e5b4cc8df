"""The base diffusion model's sample quality per UNet, at a fixed budget.

Trains the progressive-distillation example's base model (v-prediction,
continuous time, truncated-SNR weighting, EMA weights; 3,000 steps of
batch 128 by default) once per UNet and seed on the 60,000 Fashion-MNIST
training images, and measures DDIM samplers at 1 to 16 steps on 1,000
images from the same noise per seed: FID and KID on the 128 penultimate
features of one CNN classifier (trained once, so every UNet is measured
on the same features) against the 10,000 test images, and the entropy of
the samples' predicted classes. A UNet is a name and the keyword
arguments of `keras_selfdistill.diffusion.unet`, as JSON; `before:<git
revision>` builds the library's UNet of that revision instead (its
`unet.py` read with `git show`), for before/after comparisons in one
process.

    python benchmarks/diffusion_base.py [--seeds 2] [--first-seed 0]
        [--steps 3000]
        [--unet 'before:297474d'] [--unet 'official:{}'] ...
"""

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_selfdistill as ksd  # noqa: E402

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_STEP_COUNTS = (1, 2, 4, 8, 16)


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _builder(spec):
    """`name:json-kwargs`, or `name:before:<revision>`'s old `unet`."""
    name, _, rest = spec.partition(":")
    if rest.startswith("before:") or name == "before":
        revision = rest.split(":", 1)[1] if ":" in rest else rest
        source = subprocess.run(
            [
                "git",
                "show",
                f"{revision}:keras_selfdistill/diffusion/unet.py",
            ],
            cwd=_ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        path = os.path.join(tempfile.mkdtemp(), "unet_before.py")
        with open(path, "w") as file:
            file.write(source)
        return name, _load("unet_before", path).unet
    kwargs = json.loads(rest or "{}")
    library_unet = ksd.diffusion.unet
    return name, lambda shape: library_unet(shape, **kwargs)


def _mean_se(values, digits=2):
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    se = statistics.stdev(values) / len(values) ** 0.5
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--unet", action="append", default=None)
    args = parser.parse_args(argv)
    builders = [_builder(s) for s in args.unet or ["before:HEAD", "now:{}"]]
    example = _load(
        "example", _ROOT / "examples" / "progressive_distillation.py"
    )
    started = time.perf_counter()
    train, test, test_labels, train_labels = example.load_images(
        "fashion_mnist"
    )
    classifier, embed = example.train_classifier(train, train_labels)
    accuracy = classifier.evaluate(test, test_labels, verbose=0)[1]
    reference, _ = embed.predict(test, batch_size=500, verbose=0)
    real = example.quality(train[-args.samples :], embed, reference)
    scores, timings, sizes = {}, {}, {}
    library_unet = ksd.diffusion.unet
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        noise = np.random.default_rng(1000 + seed).normal(
            size=(args.samples,) + train.shape[1:]
        )
        for name, build in builders:
            # The example builds `ksd.diffusion.unet(shape)`.
            ksd.diffusion.unet = build
            try:
                base, seconds = example.train_base(train, args.steps, seed)
            finally:
                ksd.diffusion.unet = library_unet
            sizes[name] = base.student.count_params()
            timings.setdefault(name, []).append(seconds)
            for steps in _STEP_COUNTS:
                samples = ksd.diffusion.sample(base.student, noise, steps)
                result = example.quality(samples, embed, reference)
                scores.setdefault((name, steps), []).append(result)
                print(seed, name, steps, result, flush=True)
    print(
        f"\n{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Keras {keras.__version__} "
        f"({keras.backend.backend()}); {time.perf_counter() - started:.0f} "
        f"s wall; classifier test accuracy {accuracy:.4f}; real images "
        f"({args.samples} training images): FID {real['fid']:.2f}, KID "
        f"{real['kid']:.4f}, class entropy {real['class_entropy']:.3f}"
    )
    for name, spec in zip((n for n, _ in builders), args.unet or []):
        print(f"{name}: {spec}")
    print("\n| UNet | parameters | s per 1,000 steps |")
    print("|---|---|---|")
    for name, _ in builders:
        per_thousand = [s * 1000 / args.steps for s in timings[name]]
        print(f"| {name} | {sizes[name]:,} | {_mean_se(per_thousand, 0)} |")
    print("\n| steps | UNet | FID | KID | class entropy |")
    print("|---|---|---|---|---|")
    for steps in _STEP_COUNTS:
        for name, _ in builders:
            runs = scores[(name, steps)]
            print(
                f"| {steps} | {name} | "
                f"{_mean_se([r['fid'] for r in runs])} | "
                f"{_mean_se([r['kid'] for r in runs], 4)} | "
                f"{_mean_se([r['class_entropy'] for r in runs])} |"
            )


if __name__ == "__main__":
    main()
