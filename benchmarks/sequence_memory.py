"""Peak memory and step time of token-level KD, chunked against in one piece.

A language model's last layer `h @ W` gives `[rows, vocabulary]` logits for
the student and the teacher (rows = batch × sequence). One step computes
both logits, the KD loss `T² · KL` per position weighted by a padding mask,
and the gradients with respect to the student's `h` and `W`:

- `plain`: `keras_selfdistill.ops.kl_divergence` on the whole tensors;
- `chunked`: the same function through the row-chunked evaluation that
  `keras_selfdistill.terms.Distillation` uses for large vocabularies.

Peak memory is what the step allocates beyond its inputs, in units of one
`[rows, vocabulary]` float32 tensor (the two logits are two units, the
gradient with respect to the student's logits a third). TensorFlow's is
read from `tf.config.experimental.get_memory_info("CPU:0")`, JAX's from the
compiled step's `memory_analysis()` (temporaries plus outputs). Step time
is the median of repeated steps after a warm-up.

    python benchmarks/sequence_memory.py            # both backends
    python benchmarks/sequence_memory.py --backend jax --vocabulary 32768
"""

import argparse
import json
import os
import subprocess
import sys
import time

SIZES = {32768: (8, 256), 262144: (2, 128)}
HIDDEN = 64


def _measure(backend, vocabulary, mode, repeats):
    os.environ["KERAS_BACKEND"] = backend
    import numpy as np
    from keras import ops

    from keras_selfdistill import _rows
    from keras_selfdistill import ops as ksd_ops

    batch, sequence = SIZES[vocabulary]
    rows = batch * sequence
    rng = np.random.default_rng(0)
    arrays = [
        rng.normal(size=(rows, HIDDEN)).astype("float32"),
        (rng.normal(size=(HIDDEN, vocabulary)) / 8).astype("float32"),
        rng.normal(size=(rows, HIDDEN)).astype("float32"),
        (rng.normal(size=(HIDDEN, vocabulary)) / 8).astype("float32"),
    ]
    mask = (rng.uniform(size=(rows,)) < 0.8).astype("float32")

    def loss(h, w, teacher_h, teacher_w):
        student = ops.matmul(h, w)
        teacher = ops.matmul(teacher_h, teacher_w)
        if mode == "chunked":
            values = _rows.per_row(
                ksd_ops.kl_divergence, teacher, student, scalars=(2.0,)
            )
        else:
            values = ksd_ops.kl_divergence(teacher, student, 2.0)
        return ops.sum(values * mask) / rows

    one = rows * vocabulary * 4
    if backend == "jax":
        import jax

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        compiled = step.lower(*arrays).compile()
        analysis = compiled.memory_analysis()
        peak = analysis.temp_size_in_bytes + analysis.output_size_in_bytes

        def run():
            jax.block_until_ready(compiled(*arrays))

    else:
        import tensorflow as tf

        tensors = [tf.constant(a) for a in arrays]

        @tf.function
        def step(h, w, teacher_h, teacher_w):
            with tf.GradientTape() as tape:
                tape.watch([h, w])
                value = loss(h, w, teacher_h, teacher_w)
            return value, tape.gradient(value, [h, w])

        step.get_concrete_function(*tensors)
        base = tf.config.experimental.get_memory_info("CPU:0")["current"]
        tf.config.experimental.reset_memory_stats("CPU:0")
        step(*tensors)[0].numpy()
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - base

        def run():
            step(*tensors)[0].numpy()

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {
        "backend": backend,
        "vocabulary": vocabulary,
        "batch": batch,
        "sequence": sequence,
        "mode": mode,
        "peak_units": peak / one,
        "peak_mb": peak / 2**20,
        "step_s": float(np.median(times)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("tensorflow", "jax"))
    parser.add_argument("--vocabulary", type=int, choices=sorted(SIZES))
    parser.add_argument("--mode", choices=("plain", "chunked"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.backend and args.vocabulary and args.mode:
        result = _measure(
            args.backend, args.vocabulary, args.mode, args.repeats
        )
        print(json.dumps(result))
        return
    print(
        "| backend | vocabulary | batch × sequence | loss | peak beyond "
        "inputs (logit tensors) | peak MB | step s |"
    )
    print("|---|---|---|---|---|---|---|")
    for backend in [args.backend] if args.backend else ["tensorflow", "jax"]:
        for vocabulary in [args.vocabulary] if args.vocabulary else SIZES:
            for mode in [args.mode] if args.mode else ["plain", "chunked"]:
                # One process per measurement: peak memory is per process.
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        f"--backend={backend}",
                        f"--vocabulary={vocabulary}",
                        f"--mode={mode}",
                        f"--repeats={args.repeats}",
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                ).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(
                    f"| {r['backend']} | {r['vocabulary']} | {r['batch']} × "
                    f"{r['sequence']} | {r['mode']} | {r['peak_units']:.2f} | "
                    f"{r['peak_mb']:.0f} | {r['step_s']:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
