"""Losses and gradients of every mixture target, for two source trees.

The temperature contract (issue 27) changed what mixing teachers return
(log-probabilities, not `T · log(mixture)`) and gave every mixture one
function; this records, for fixed weights and logits, each affected
loss's value and its gradient in the student's logits: `Ensemble`
(weights 1:1:2) under KL, reverse KL, JSD (β 0.3), DKD (β 8), each with
and without `standardize`, and with `vocabulary_size`; `Snapshot`
(average and vote, two snapshots of three slots); `PastPredictions`
after a first visit; `AuxiliaryExits(direction="shallow_to_deep")`; at
T = 1, 2, 4 and 12. Run it under each tree, then compare:

    git worktree add /tmp/before d7aaa7b
    PYTHONPATH=/tmp/before python benchmarks/temperature_contract.py \\
        before.npz
    python benchmarks/temperature_contract.py after.npz
    python benchmarks/temperature_contract.py --compare before.npz after.npz

The comparison prints, per family and temperature, the largest
difference relative to the largest magnitude of the array.
"""

import argparse
import collections
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_selfdistill as ksd  # noqa: E402

CLASSES = 5
LOSSES = (
    ("kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.3}),
    ("dkd", {"beta": 8.0}),
)


def _mlp(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(CLASSES),
        ]
    )


def _value_and_gradient(function, logits):
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        logits = tf.constant(logits)
        with tf.GradientTape() as tape:
            tape.watch(logits)
            value = function(logits)
        return np.asarray(value), np.asarray(tape.gradient(value, logits))
    import jax

    value, gradient = jax.value_and_grad(function)(logits)
    return np.asarray(value), np.asarray(gradient)


def record():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, CLASSES, size=16)
    student_logits = (rng.normal(size=(16, CLASSES)) * 2).astype("float32")
    members = [_mlp(seed) for seed in (1, 2, 3)]
    out = {}

    def run(name, term, inputs, outputs=None):
        def function(logits):
            y_pred = logits if outputs is None else dict(outputs, output=logits)
            return term.compute_loss(inputs, y, y_pred, None, 0, 0)

        value, gradient = _value_and_gradient(function, student_logits)
        out[f"{name}/value"], out[f"{name}/grad"] = value, gradient

    for t in (1.0, 2.0, 4.0, 12.0):
        for loss, kwargs in LOSSES:
            for standardize in (False, True):
                term = ksd.terms.Distillation(
                    ksd.teachers.Ensemble(members, weights=[1, 1, 2]),
                    loss=loss,
                    temperature=t,
                    standardize=standardize,
                    **kwargs,
                )
                term.attach(_mlp(9))
                run(f"ensemble/{loss}/T{t}/std{standardize}", term, x)
            for combine in ("average", "vote"):
                snapshot = ksd.teachers.Snapshot(keep=3, combine=combine)
                student = _mlp(5)
                term = ksd.terms.Distillation(
                    snapshot, loss=loss, temperature=t, **kwargs
                )
                term.attach(student)
                for seed in (6, 7):
                    student.set_weights(_mlp(seed).get_weights())
                    snapshot.on_epoch_end(0)
                run(f"snapshot/{combine}/{loss}/T{t}", term, x)
            bank = ksd.teachers.PastPredictions(16, CLASSES)
            term = ksd.terms.Distillation(
                bank, loss=loss, temperature=t, **kwargs
            )
            term.attach(_mlp(9))
            first = (rng.normal(size=(8, CLASSES)) * 2).astype("float32")
            bank.targets_and_mask({"sample_id": np.arange(8)}, first, 1.0)
            run(f"past/{loss}/T{t}", term, {"sample_id": np.arange(16)})
        term = ksd.terms.Distillation(
            ksd.teachers.Ensemble(members), temperature=t, vocabulary_size=4
        )
        term.attach(_mlp(9))
        run(f"ensemble/vocabulary/T{t}", term, x)
        term = ksd.terms.AuxiliaryExits(
            ["b1", "b2"], xi=0.4, temperature=t, direction="shallow_to_deep"
        )
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6, 6, 1))
        h = keras.layers.Conv2D(4, 3, padding="same", name="b1")(inputs)
        h = keras.layers.Conv2D(6, 3, strides=2, name="b2")(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        term.attach(keras.Model(inputs, keras.layers.Dense(CLASSES)(h)))
        exits = {
            name: (rng.normal(size=(16, CLASSES)) * 3).astype("float32")
            for name in ("b1", "b2")
        }
        run(f"exits/T{t}", term, None, exits)
    return out


def compare(before, after):
    before = np.load(before, allow_pickle=False)
    after = np.load(after, allow_pickle=False)
    worst = collections.defaultdict(float)
    for key in before.files:
        a = before[key].astype("float64")
        b = after[key].astype("float64")
        difference = np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12)
        family = key.split("/")[0]
        temperature = next(p for p in key.split("/") if p.startswith("T"))
        group = (family, float(temperature[1:]))
        worst[group] = max(worst[group], difference)
    print("family      T     largest relative difference")
    for (family, temperature), difference in sorted(worst.items()):
        print(f"{family:10s} {temperature:5.1f}  {difference:.1e}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output", nargs="?")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    arguments = parser.parse_args()
    if arguments.compare:
        compare(*arguments.compare)
        return
    np.savez(arguments.output, **record())
    print(f"{keras.backend.backend()}: wrote {arguments.output}")


if __name__ == "__main__":
    main()
