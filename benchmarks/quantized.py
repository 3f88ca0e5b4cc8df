"""Quantised students of the standard-library-text language model.

The teacher of `examples/language_model.py` (a 2-layer pre-norm causal
transformer, width 128, byte tokens, trained with cross-entropy on the
Python standard library's sources) is quantised by
`keras_selfdistill.pruning.quantize`, and evaluated as it is (int8, int4)
and after training LoRA adapters on the int4 kernels (rank `--rank`, every
other weight frozen, QLoRA-style) for `--steps` steps, either by
distillation from the float teacher (forward KL, no cross-entropy) or by
cross-entropy on the text. Held-out perplexity on the example's 2,000
held-out windows, the mean KL divergence per token from the float
teacher's predictions there, and the size of the `.keras` file (adapters
merged into the re-quantised kernels, as Keras saves them). The control
trains the float teacher itself (every weight, cross-entropy) for the
same steps:

    python benchmarks/quantized.py --teacher-file teacher.keras

Seeds (`--seeds`) vary the adapters' initialisation and the batches.
"""

import argparse
import json
import os
import tempfile
import time

import keras
import numpy as np
from _examples import load as _example

import keras_selfdistill as ksd

LM = _example("language_model")


def saved_bytes(model):
    """The size of `model` saved as `.keras`, without an optimizer's
    state (an unbuilt optimizer, as KerasHub tasks compile by default, has
    none)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        # `clone_model` would compile the copy as the original.
        trained = model
        model = type(trained).from_config(trained.get_config())
        model.set_weights(trained.get_weights())
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.keras")
        model.save(path)
        return os.path.getsize(path)


def log_probs(model, x, batch_size=64, as_inputs=None):
    """The next-token log-probabilities of `model` on `x`, in float32;
    `as_inputs` makes the model's inputs of a batch of `x`."""
    parts = []
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        logits = model.predict_on_batch(
            as_inputs(batch) if as_inputs else batch
        )
        logits = np.asarray(logits, "float64")
        top = logits.max(-1, keepdims=True)
        total = np.log(np.exp(logits - top).sum(-1, keepdims=True))
        parts.append((logits - top - total).astype("float32"))
    return np.concatenate(parts)


def measure(model, teacher_log_probs, test_x, test_y):
    """Held-out perplexity, the mean KL(teacher ‖ model) per token (nats)
    and the size on disk."""
    own = log_probs(model, test_x)
    kl = np.sum(np.exp(teacher_log_probs) * (teacher_log_probs - own), -1)
    return {
        "perplexity": LM.perplexity(model, test_x, test_y)[0],
        "kl_to_float": float(np.mean(kl)),
        "bytes": saved_bytes(model),
    }


def adapted(teacher, method, mode, args, x, y, seed):
    """`teacher` quantised, its adapters trained by `method`; with `mode`
    `None`, the float teacher itself trained on (the control)."""
    keras.utils.set_random_seed(seed)
    if mode is None:
        student = type(teacher).from_config(teacher.get_config())
        student.set_weights(teacher.get_weights())
    else:
        student = ksd.pruning.quantize(teacher, mode, lora_rank=args.rank)
    terms, loss = [], LM._ce()
    if method == "kd":
        terms = [
            ksd.terms.Distillation(
                teacher, loss="kl", reduction="mean_with_sample_weight"
            )
        ]
        loss = None
    distiller = ksd.Distiller(student, terms)
    distiller.compile(optimizer=keras.optimizers.Adam(args.lr), loss=loss)
    bx, by = LM._batches(x, y, args.batch_size, args.steps, seed=seed)
    start = time.perf_counter()
    distiller.fit(bx, by, batch_size=args.batch_size, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    return student, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher-file", default=None)
    parser.add_argument("--teacher-steps", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    # The example's settings.
    args.length, args.batch_size = 64, 32
    args.vocabulary = LM.VOCABULARY
    train, held_out = LM.corpus(args.limit, args.vocabulary)
    x, y = LM.windows(train, args.length)
    test_x, test_y = [a[:2000] for a in LM.windows(held_out, args.length)]
    if args.teacher_file and os.path.exists(args.teacher_file):
        teacher = keras.saving.load_model(args.teacher_file)
    else:
        teacher = LM.train_teacher(args, x, y)
        if args.teacher_file:
            teacher.save(args.teacher_file)
    reference = log_probs(teacher, test_x)
    rows = {"float32": measure(teacher, reference, test_x, test_y)}
    for mode in ("int8", "int4"):
        quantised = ksd.pruning.quantize(teacher, mode)
        rows[mode] = measure(quantised, reference, test_x, test_y)
    for name, value in rows.items():
        print(f"{name}: {value}", flush=True)
    runs_of = (
        ("float32 + ce (all weights)", None, "ce"),
        ("int4 + LoRA kd", "int4", "kd"),
        ("int4 + LoRA ce", "int4", "ce"),
        ("int8 + LoRA kd", "int8", "kd"),
    )
    for name, mode, method in runs_of:
        runs = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            student, seconds = adapted(teacher, method, mode, args, x, y, seed)
            run = measure(student, reference, test_x, test_y)
            run.update(seed=seed, seconds=seconds)
            runs.append(run)
            print(f"{name} seed {seed}: {run}", flush=True)
        rows[name] = runs
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=2)
    return rows


if __name__ == "__main__":
    main()
