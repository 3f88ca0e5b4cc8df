"""How long hashing NumPy inputs takes: the rows' bytes against tf.data.

`with_sample_ids` on NumPy inputs, and every `fit` of a distiller with a
cached teacher on them, hash each example (`keras_selfdistill.batch.
fingerprint`). Times the library's `array_fingerprints` (the rows' bytes
assembled in NumPy, hashed in one op per chunk) against the per-example
`tf.data` map it replaced, on the 4,000 bundled MNIST images and on
Fashion-MNIST's 60,000 when Debian's `dataset-fashion-mnist` is installed;
checks that both give the same fingerprints. Medians of `--rounds`
interleaved rounds.

    python benchmarks/fingerprints.py [--rounds 7]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_selfdistill as ksd  # noqa: E402
from keras_selfdistill import batch  # noqa: E402


def per_example(x):
    """The per-example path: one `tf.data` element per example."""
    rows = tf.data.Dataset.from_tensor_slices(x).map(
        batch.fingerprint, num_parallel_calls=tf.data.AUTOTUNE
    )
    return np.concatenate([b.numpy() for b in rows.batch(8192)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    inputs = {"bundled MNIST": ksd.datasets.load_mnist()[0][0]}
    try:
        inputs["Fashion-MNIST"] = ksd.datasets.load_fashion_mnist()[0][0]
    except (OSError, ValueError) as error:
        print(f"Fashion-MNIST skipped: {error}")
    print(
        "| inputs | examples | per example (tf.data), s | rows' bytes, s "
        "| speed-up |"
    )
    print("|---|---|---|---|---|")
    for name, x in inputs.items():
        fast = batch.array_fingerprints(x, len(x))
        np.testing.assert_array_equal(fast, per_example(x))
        times = {"slow": [], "fast": []}
        for _ in range(args.rounds):
            for kind, function in (
                ("slow", per_example),
                ("fast", lambda x: batch.array_fingerprints(x, len(x))),
            ):
                start = time.perf_counter()
                function(x)
                times[kind].append(time.perf_counter() - start)
        slow = statistics.median(times["slow"])
        fast = statistics.median(times["fast"])
        print(
            f"| {name} | {len(x):,} | {slow:.3f} | {fast:.4f} | "
            f"{slow / fast:.0f}× |"
        )


if __name__ == "__main__":
    main()
