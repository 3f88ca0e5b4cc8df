"""Progressive distillation of a DDIM sampler on Fashion-MNIST.

    python examples/progressive_distillation.py
    python examples/progressive_distillation.py --data bundled_mnist \
        --base-steps 300 --round-steps 100 --samples 200

Trains a small v-prediction UNet on images in continuous time (the
moving average of its weights is the model), then distils its DDIM
sampler from 16 steps to 8, 4 and 2 in rounds of `fit`
(`keras_selfdistill.diffusion.progressive_distillation`), and measures
each sampler on 1,000 samples from fixed noise: FID and KID on the
features of a classifier trained on the same data (Inception's ImageNet
weights cannot be downloaded offline), and the entropy of the samples'
predicted classes. `--data fashion_mnist` (the default) reads Debian's
`dataset-fashion-mnist` through its tensorflow-datasets builder;
`--data bundled_mnist` uses the 5,000 digits inside the package.
"""

import argparse
import os
import time

import keras
import numpy as np

import keras_selfdistill as ksd


def load_images(source, limit=None):
    """`(train, test, test_labels, train_labels)`, images in `[−1, 1]`."""
    if source == "fashion_mnist":
        import tensorflow_datasets as tfds

        import keras_selfdistill.datasets.builders  # noqa: F401

        splits = tfds.load(
            "local_fashion_mnist",
            split=["train", "test"],
            as_supervised=True,
            batch_size=-1,
        )
        (x, y), (x_test, y_test) = (tfds.as_numpy(s) for s in splits)
        x = x.astype("float32") / 255.0
        x_test = x_test.astype("float32") / 255.0
    else:
        (x, y), (x_test, y_test) = ksd.datasets.load(source)
    if limit:
        x, y, x_test, y_test = (
            x[:limit],
            y[:limit],
            x_test[:limit],
            y_test[:limit],
        )
    return x * 2 - 1, x_test * 2 - 1, y_test, y


def _dataset(images, batch_size, seed):
    import tensorflow as tf

    return (
        tf.data.Dataset.from_tensor_slices(images)
        .shuffle(len(images), seed=seed)
        .batch(batch_size, drop_remainder=True)
        .repeat()
        .prefetch(2)
    )


def train_base(
    images,
    steps,
    seed,
    batch_size=128,
    learning_rate=1e-3,
    verbose=0,
    data=None,
    ema_momentum=0.999,
):
    """The base diffusion model, its weights the EMA's at the end.

    `data`, if given, replaces the `tf.data` pipeline of `images` (batches
    of `batch_size` images, at least `steps` of them); `ema_momentum` is
    the weight average's (the model's weights at the end). Returns
    `(distiller, seconds)`; `distiller.student` is the model.
    """
    keras.utils.set_random_seed(seed)
    distiller = ksd.Distiller(
        ksd.diffusion.unet(images.shape[1:]),
        [ksd.terms.Denoising(seed=seed)],
    )
    distiller.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(
                learning_rate, steps, alpha=0.1
            ),
            global_clipnorm=1.0,
            use_ema=True,
            ema_momentum=ema_momentum,
        )
    )
    start = time.perf_counter()
    if data is None:
        data = _dataset(images, batch_size, seed)
    _fit_steps(distiller, data, steps, verbose=verbose)
    return distiller, time.perf_counter() - start


def _fit_steps(distiller, data, steps, callbacks=(), verbose=0):
    per_epoch = min(steps, 500)
    epochs = -(-steps // per_epoch)
    return distiller.fit(
        data,
        epochs=epochs,
        steps_per_epoch=per_epoch,
        shuffle=False,  # the dataset is shuffled
        verbose=verbose,
        callbacks=list(callbacks),
    )


def distil(
    model,
    images,
    start_steps,
    end_steps,
    round_steps,
    seed,
    batch_size=128,
    learning_rate=2e-4,
    directory=None,
    verbose=0,
    data=None,
):
    """Progressive rounds from `start_steps` to `end_steps`.

    Returns `(rounds, seconds)`; each round trains `round_steps` steps of
    Adam with the official gradient clipping, its learning rate annealed
    linearly to 0 (the official schedule, shortened). `data`, if given,
    replaces the `tf.data` pipeline of `images`: `round_steps` batches a
    round.
    """
    if data is None:
        import tensorflow as tf

        data = (
            tf.data.Dataset.from_tensor_slices(images)
            .shuffle(len(images), seed=seed)
            .batch(batch_size, drop_remainder=True)
            .take(round_steps)
        )
    optimizer = keras.optimizers.Adam(
        keras.optimizers.schedules.PolynomialDecay(
            learning_rate, round_steps, end_learning_rate=0.0
        ),
        global_clipnorm=1.0,
    )
    start = time.perf_counter()
    rounds = ksd.diffusion.progressive_distillation(
        model,
        data,
        num_steps=start_steps,
        end_steps=end_steps,
        directory=directory,
        compile_kwargs={"optimizer": optimizer},
        epochs=1,
        shuffle=False,
        seed=seed,
        verbose=verbose,
    )
    return rounds, time.perf_counter() - start


def train_classifier(images, labels, epochs=2, seed=0):
    """A CNN classifier and the model giving its 128 penultimate features."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(images.shape[1:])
    h = keras.layers.Conv2D(32, 3, activation="relu")(inputs)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(64, 3, activation="relu")(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    features = keras.layers.Dense(128, activation="relu", name="features")(h)
    logits = keras.layers.Dense(10)(features)
    classifier = keras.Model(inputs, logits, name="classifier")
    classifier.compile(
        "adam",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    classifier.fit(images, labels, batch_size=128, epochs=epochs, verbose=0)
    return classifier, keras.Model(inputs, [features, logits])


def quality(samples, embed, reference):
    """FID, KID and class entropy of `samples` against `reference` features."""
    features, logits = embed.predict(samples, batch_size=500, verbose=0)
    return {
        "fid": ksd.diffusion.frechet_distance(features, reference),
        "kid": ksd.diffusion.kernel_distance(
            features, reference, subset_size=min(1000, len(samples))
        ),
        "class_entropy": ksd.diffusion.class_entropy(logits),
    }


class _Help(
    argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter
):
    """The docstring as written, and every option's default."""


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    parser.add_argument(
        "--data",
        choices=["fashion_mnist", "bundled_mnist"],
        default="fashion_mnist",
        help="images to train on (both offline)",
    )
    parser.add_argument(
        "--base-steps", type=int, default=3000, help="base model steps"
    )
    parser.add_argument(
        "--round-steps", type=int, default=650, help="steps per round"
    )
    parser.add_argument(
        "--start-steps", type=int, default=16, help="the base sampler's steps"
    )
    parser.add_argument(
        "--end-steps", type=int, default=2, help="the last student's steps"
    )
    parser.add_argument(
        "--samples", type=int, default=1000, help="samples per sampler"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="use this many images"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--output-dir", default="progressive_distillation", help="outputs"
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    train, test, test_labels, train_labels = load_images(args.data, args.limit)
    print("training the classifier whose features FID reads", flush=True)
    _, embed = train_classifier(train, train_labels)
    reference, _ = embed.predict(test, batch_size=500, verbose=0)
    print(f"training the base model ({args.base_steps} steps)", flush=True)
    base, base_seconds = train_base(
        train, args.base_steps, args.seed, verbose=2
    )
    print(
        f"distilling {args.start_steps} -> {args.end_steps} sampler steps "
        f"({args.round_steps} steps a round)",
        flush=True,
    )
    rounds, round_seconds = distil(
        base.student,
        train,
        args.start_steps,
        args.end_steps,
        args.round_steps,
        args.seed,
        directory=os.path.join(args.output_dir, "rounds"),
        verbose=2,
    )
    noise = np.random.default_rng(1000 + args.seed).normal(
        size=(args.samples,) + train.shape[1:]
    )
    results = {"base_seconds": base_seconds, "round_seconds": round_seconds}
    students = {r["num_steps"]: r["student"] for r in rounds}
    print("| steps | sampler | FID | KID | class entropy |")
    print("|---|---|---|---|---|")
    for steps in sorted({args.start_steps, *students}):
        for name, model in (
            ("undistilled", base.student),
            ("distilled", students.get(steps)),
        ):
            if model is None:
                continue
            samples = ksd.diffusion.sample(model, noise, steps)
            scores = quality(samples, embed, reference)
            results[f"{name}/{steps}"] = scores
            print(
                f"| {steps} | {name} | {scores['fid']:.2f} | "
                f"{scores['kid']:.4f} | {scores['class_entropy']:.3f} |"
            )
    base.student.save(os.path.join(args.output_dir, "base.keras"))
    return results


if __name__ == "__main__":
    main()
