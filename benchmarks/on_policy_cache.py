"""Step time of on-policy distillation with and without KerasHub's cache.

A KerasHub `GemmaCausalLM` student (2 layers) is distilled from a 4-layer
one by token-level JSD (`mean_with_sample_weight`):

- `kd`: off-policy, the dataset's sequences;
- `gkd_cached`: `OnPolicy` (every step on-policy), the student writing the
  continuations with its key/value cache (`call_with_cache`), the path
  `CausalLM.generate_step` takes;
- `gkd_uncached`: the same, with the cache hidden, so that the student runs
  over the whole sequence once per new token.

Each variant trains for `--steps` steps after a warm-up epoch (the
compilation); the step time is the median of the timed steps. Both backends
run in their own processes.

    python benchmarks/on_policy_cache.py
    python benchmarks/on_policy_cache.py --backend jax --length 256
"""

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = ("kd", "gkd_cached", "gkd_uncached")


def _gemma(keras_hub, layers, hidden, seed):
    import keras

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=256,
        num_layers=layers,
        num_query_heads=4,
        num_key_value_heads=1,
        hidden_dim=hidden,
        intermediate_dim=hidden * 4,
        head_dim=hidden // 4,
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


class _StepTimes:
    def __init__(self):
        self.times = []

    def callback(self):
        import keras

        times = self.times

        class Timer(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                self.start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                times.append(time.perf_counter() - self.start)

        return Timer()


def _measure(backend, variant, args):
    os.environ["KERAS_BACKEND"] = backend
    from unittest import mock

    import keras_hub
    import numpy as np

    import keras_selfdistill as ksd

    rng = np.random.default_rng(0)
    n = args.batch * args.steps
    ids = rng.integers(1, 256, size=(n, args.length + 1)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    y = ids[:, 1:]
    teacher = _gemma(keras_hub, 4, 128, seed=1)
    terms = [
        ksd.terms.Distillation(
            teacher, loss="jsd", reduction="mean_with_sample_weight"
        )
    ]
    if variant != "kd":
        terms.append(ksd.terms.OnPolicy(args.prompt, temperature=1.0, seed=0))
    distiller = ksd.Distiller(_gemma(keras_hub, 2, 64, seed=2), terms)
    distiller.compile(optimizer="adam")
    timer = _StepTimes()
    hide = mock.patch(
        "keras_selfdistill._internals.cached_decoder", return_value=None
    )
    if variant == "gkd_uncached":
        hide.start()
    # The warm-up epoch compiles the step; the second is timed.
    distiller.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)
    distiller.fit(
        x,
        y,
        batch_size=args.batch,
        epochs=1,
        verbose=0,
        callbacks=[timer.callback()],
    )
    if variant == "gkd_uncached":
        hide.stop()
    step = float(np.median(timer.times))
    return {
        "backend": backend,
        "variant": variant,
        "step_s": step,
        "tokens_per_s": args.batch * args.length / step,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        choices=("tensorflow", "jax", "both"),
        default="both",
        help="Keras backend(s) to measure (default: both).",
    )
    parser.add_argument(
        "--length", type=int, default=128, help="Sequence length."
    )
    parser.add_argument(
        "--prompt", type=int, default=32, help="Prompt tokens kept."
    )
    parser.add_argument("--batch", type=int, default=8, help="Batch size.")
    parser.add_argument(
        "--steps", type=int, default=5, help="Timed steps per variant."
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        backend, variant = args.one.split(":")
        print(json.dumps(_measure(backend, variant, args)))
        return
    backends = (
        ("tensorflow", "jax") if args.backend == "both" else (args.backend,)
    )
    print(
        f"length {args.length}, prompt {args.prompt}, batch {args.batch}, "
        f"{args.steps} timed steps"
    )
    print("| backend | variant | median step s | tokens/s | × kd |")
    print("|---|---|---|---|---|")
    for backend in backends:
        kd = None
        for variant in VARIANTS:
            command = [sys.argv[0], "--one", f"{backend}:{variant}"]
            for flag in ("length", "prompt", "batch", "steps"):
                command += [f"--{flag}", str(getattr(args, flag))]
            output = subprocess.run(
                [sys.executable, *command],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            result = json.loads(output.strip().splitlines()[-1])
            kd = kd or result["step_s"]
            print(
                f"| {backend} | {variant} | {result['step_s']:.3f} | "
                f"{result['tokens_per_s']:,.0f} | "
                f"{result['step_s'] / kd:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
