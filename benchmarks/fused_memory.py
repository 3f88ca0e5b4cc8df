"""Peak memory and step time of LM distillation: unfused, chunked, fused.

One training step of a `Distiller` (optimizer update included) on a
language model at vocabulary sizes of 32k, 128k and 256k, with the
objective `(1 − ξ) · CE + ξ · T² · KL` (ξ = 0.5, T = 2) over padded
sequences, four ways:

- `unfused`: `terms.Distillation` with the divergence in one piece and a
  compiled `SparseCategoricalCrossentropy(from_logits=True)`;
- `chunked`: the same with `Distillation`'s row-chunked divergence (the
  library's default above 4M logits);
- `fused`: `terms.FusedDistillation(label_loss=True)`, gradients computed
  in the forward loop;
- `fused_recompute`: the same with `recompute=True`.

The student is a Gemma-like model whose head is its token embedding,
reversed (tied); the teacher has its own embedding and an untied `Dense`
head, both of width `--width`.

Memory is what the step needs beyond the model and the optimizer: on JAX
the compiled step's temporaries (`memory_analysis().temp_size_in_bytes`,
which hold the gradients where XLA does not write them into the outputs);
on TensorFlow the allocator's peak during a step (after a warm-up step)
less what was allocated before it (`tf.config.experimental.
get_memory_info`, with `TF_CPU_ALLOCATOR_USE_BFC=true` on a CPU, which
the script sets), gradients included. The table also gives it in units of
the student head's weight gradient (`vocabulary × width` float32), the
issue's yardstick (the anchors' regime: at most 1.5 of them). Step time
is the median of `--repeats` steps after one warm-up step
(`train_on_batch`), each configuration in its own process.

    python benchmarks/fused_memory.py                       # this machine
    python benchmarks/fused_memory.py --preset accelerator  # a GPU
"""

import argparse
import json
import os
import subprocess
import sys
import time

PRESETS = {
    # 2 CPU cores, 24 GB: the unfused loss fits at 1,024 tokens.
    "cpu": dict(batch=4, sequence=256, width=128, repeats=3),
    # One accelerator, under 5 minutes: 8,192 tokens.
    "accelerator": dict(batch=8, sequence=1024, width=1024, repeats=5),
    # The anchors' regime on JAX, compiled but not run (no step, no time):
    # XLA's memory analysis of the step at 8,192 tokens and width 2,048.
    "compiled": dict(batch=8, sequence=1024, width=2048, repeats=0),
}
VOCABULARIES = (32768, 131072, 262144)
MODES = ("unfused", "chunked", "fused", "fused_recompute")


def _models(keras, vocabulary, width):
    keras.utils.set_random_seed(0)
    ids = keras.Input((None,), dtype="int32", name="token_ids")
    embedding = keras.layers.ReversibleEmbedding(
        vocabulary, width, name="token_embedding"
    )
    hidden = embedding(ids)
    hidden = hidden + keras.layers.Dense(width, activation="gelu")(hidden)
    student = keras.Model(ids, embedding(hidden, reverse=True))
    teacher_ids = keras.Input((None,), dtype="int32", name="token_ids")
    hidden = keras.layers.Embedding(vocabulary, width)(teacher_ids)
    hidden = hidden + keras.layers.Dense(width, activation="gelu")(hidden)
    head = keras.layers.Dense(vocabulary, use_bias=False, name="head")
    teacher = keras.Model(teacher_ids, head(hidden))
    return student, teacher


def _distiller(keras, ksd, mode, vocabulary, width, chunk=None):
    student, teacher = _models(keras, vocabulary, width)
    if mode.startswith("fused"):
        term = ksd.terms.FusedDistillation(
            teacher,
            temperature=2.0,
            xi=0.5,
            label_loss=True,
            recompute=mode == "fused_recompute",
            chunk_size=chunk,
        )
        loss = None
    else:
        term = ksd.terms.Distillation(teacher, temperature=2.0, xi=0.5)
        if mode == "unfused":
            term._chunk_elements = 1 << 62
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    distiller = ksd.Distiller(student, [term])
    distiller.compile(optimizer=keras.optimizers.Adam(1e-4), loss=loss)
    return distiller


def _measure(
    backend, mode, vocabulary, batch, sequence, width, repeats, chunk=None
):
    os.environ["KERAS_BACKEND"] = backend
    import keras
    import numpy as np

    import keras_selfdistill as ksd

    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocabulary, size=(batch, sequence + 1))
    lengths = rng.integers(sequence // 2, sequence + 1, size=(batch, 1))
    weights = (np.arange(sequence) < lengths).astype("float32")
    x, y = ids[:, :-1].astype("int32"), ids[:, 1:].astype("int32")
    distiller = _distiller(keras, ksd, mode, vocabulary, width, chunk)
    head = vocabulary * width * 4
    device = "GPU:0" if _has_gpu(backend) else "CPU:0"

    def step():
        return distiller.train_on_batch(x, y, sample_weight=weights)

    if repeats:
        step()
    else:
        distiller.optimizer.build(distiller.trainable_variables)
    if backend == "jax":
        import jax

        state = (
            [v.value for v in distiller.trainable_variables],
            [v.value for v in distiller.non_trainable_variables],
            [v.value for v in distiller.optimizer.variables],
            [v.value for v in distiller.metrics_variables],
        )
        data = (x, y, weights)
        lowered = jax.jit(distiller.train_step).lower(state, data)
        used = lowered.compile().memory_analysis().temp_size_in_bytes
    else:
        import tensorflow as tf

        base = tf.config.experimental.get_memory_info(device)["current"]
        tf.config.experimental.reset_memory_stats(device)
        step()
        used = tf.config.experimental.get_memory_info(device)["peak"] - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "backend": backend,
        "mode": mode,
        "vocabulary": vocabulary,
        "tokens": batch * sequence,
        "width": width,
        "step_mb": used / 2**20,
        "head_units": used / head,
        "logits_mb": batch * sequence * vocabulary * 4 / 2**20,
        "step_s": float(np.median(times)) if times else float("nan"),
    }


def _has_gpu(backend):
    if backend == "jax":
        import jax

        return jax.default_backend() == "gpu"
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--backend", choices=("tensorflow", "jax"))
    parser.add_argument("--vocabulary", type=int)
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--chunk", type=int, help="positions per chunk of the fused loss"
    )
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if args.backend and args.vocabulary and args.mode:
        print(
            json.dumps(
                _measure(
                    args.backend,
                    args.mode,
                    args.vocabulary,
                    chunk=args.chunk,
                    **preset,
                )
            )
        )
        return
    print(
        f"{preset['batch']} × {preset['sequence']} tokens, width "
        f"{preset['width']}; memory beyond the model and the optimizer\n"
    )
    print(
        "| backend | vocabulary | loss | step extra MB | × head gradient | "
        "below unfused | one logit tensor MB | step s | × unfused time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    backends = ["jax", "tensorflow"] if preset["repeats"] else ["jax"]
    for backend in [args.backend] if args.backend else backends:
        for vocabulary in (
            [args.vocabulary] if args.vocabulary else VOCABULARIES
        ):
            unfused = unfused_mb = None
            for mode in [args.mode] if args.mode else MODES:
                # One process per measurement: peak memory is per process.
                try:
                    out = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            f"--preset={args.preset}",
                            f"--backend={backend}",
                            f"--vocabulary={vocabulary}",
                            f"--mode={mode}",
                        ]
                        + ([f"--chunk={args.chunk}"] if args.chunk else []),
                        capture_output=True,
                        text=True,
                        timeout=args.timeout,
                        env=dict(
                            os.environ,
                            TF_CPP_MIN_LOG_LEVEL="3",
                            # The CPU allocator's statistics.
                            TF_CPU_ALLOCATOR_USE_BFC="true",
                        ),
                    )
                except subprocess.TimeoutExpired:
                    print(f"| {backend} | {vocabulary} | {mode} | timed out |")
                    continue
                if out.returncode != 0:
                    why = (out.stderr.strip().splitlines() or ["?"])[-1][:80]
                    print(
                        f"| {backend} | {vocabulary} | {mode} | failed: {why} |"
                    )
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if mode == "unfused":
                    unfused, unfused_mb = r["step_s"], r["step_mb"]
                ratio = f"{r['step_s'] / unfused:.2f}" if unfused else "–"
                below = (
                    f"{100 * (1 - r['step_mb'] / unfused_mb):.1f}%"
                    if unfused_mb
                    else "–"
                )
                print(
                    f"| {backend} | {vocabulary} | {mode} | {r['step_mb']:.0f} "
                    f"| {r['head_units']:.2f} | {below} | {r['logits_mb']:.0f} "
                    f"| {r['step_s']:.3f} | {ratio} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
