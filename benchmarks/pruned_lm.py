"""Halve a standard-library-text LM's depth, then recover it.

The original is a KerasHub `GPT2CausalLM` built from a config (no
download): 4 layers, width 128, 4 heads, MLP width 512, no dropout, on
the byte tokens and 64-byte windows of `examples/language_model.py` (the
Python standard library's sources), trained with cross-entropy for
`--original-steps` steps (Adam 1e-3, batch 32). Its layers are scored by
Block Importance on 64 training windows and the 2 least important are
dropped (`keras_selfdistill.pruning.prune_backbone`: a `GPT2Backbone` of 2
layers, every kept weight copied). Then, per seed, for `--steps` steps
with the original's optimizer:

- `none`: the pruned model, not trained;
- `ce`: fine-tuned with cross-entropy on the text;
- `kd`: distilled from the original, forward KL alone (Minitron's
  logit loss, no cross-entropy);
- `self_data`: fine-tuned with cross-entropy on the original's greedy
  continuations of each window's first 32 bytes
  (`keras_selfdistill.recipes.self_data`);
- `scratch`: the 2-layer architecture, freshly initialised, trained with
  cross-entropy for `--original-steps` + `--steps` steps (the original's
  training and the recovery together);
- `kd int8`: the `kd` student quantised to int8
  (`keras_selfdistill.pruning.quantize`), not trained;
- `kd int8 + LoRA kd`: the `kd` student quantised to int8 but for its
  token embedding (KerasHub's int8 LM head passes no gradient to its
  inputs: `keras_selfdistill.pruning.quantize`'s docstring), with LoRA
  adapters of rank 8 on every quantised layer (everything else frozen),
  distilled again from the original for `--steps` steps.

Reported: held-out perplexity on the example's 2,000 held-out windows,
the mean KL divergence per token from the original's predictions there
(nats), parameters, the `.keras` file's bytes (no optimizer) and the wall
seconds of training. Seeds vary the batches, the scratch model's
initialisation and the adapters'. Each seed may run in its own process:

    python benchmarks/pruned_lm.py --original-file original.keras \\
        --seeds 0 --log seed0.log           # trains the original once
    python benchmarks/pruned_lm.py --table seed0.log seed1.log ...

`--methods` measures some rows only (`kd` trains for the rows after it).
"""

import argparse
import json
import os
import time

import keras
import keras_hub
import numpy as np
from _examples import load as _example
from pruning import append_log
from pruning import mean_se
from pruning import read_logs
from quantized import log_probs
from quantized import saved_bytes

import keras_selfdistill as ksd

LM = _example("language_model")
LENGTH, BATCH = 64, 32
METHODS = (
    "original",
    "original int8",
    "none",
    "ce",
    "kd",
    "self_data",
    "scratch",
    "kd int8",
    "kd int8 + LoRA kd",
)


def causal_lm(num_layers, seed):
    """A GPT-2 causal LM of `num_layers` layers over byte tokens."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=LM.VOCABULARY,
        num_layers=num_layers,
        num_heads=4,
        hidden_dim=128,
        intermediate_dim=512,
        dropout=0.0,
        max_sequence_length=LENGTH,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def inputs(ids):
    """KerasHub's inputs for windows of token ids (no padding)."""
    return {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}


def measure(model, reference, test_x, test_y):
    own = log_probs(model, test_x, as_inputs=inputs)
    nll = -np.take_along_axis(own, test_y[..., None], -1).mean()
    kl = np.sum(np.exp(reference) * (reference - own), -1)
    return {
        "perplexity": float(np.exp(nll)),
        "kl_to_original": float(np.mean(kl)),
        "params": int(model.count_params()),
        "bytes": saved_bytes(model),
    }


def train(model, terms, steps, x, y, seed):
    """Wall seconds of `steps` steps of `Distiller(model, terms)`; the
    cross-entropy is the loss unless a term replaces it."""
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if any(isinstance(t, ksd.terms.Distillation) for t in terms):
        loss = None
    distiller = ksd.Distiller(model, terms)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    bx, by = LM._batches(x, y, BATCH, steps, seed=seed)
    start = time.perf_counter()
    distiller.fit(inputs(bx), by, batch_size=BATCH, epochs=1, verbose=0)
    return time.perf_counter() - start


def original_model(args, x, y):
    if args.original_file and os.path.exists(args.original_file):
        return keras.saving.load_model(args.original_file)
    original = causal_lm(4, seed=100)
    print(f"training the original ({args.original_steps} steps)", flush=True)
    train(original, [], args.original_steps, x, y, seed=100)
    if args.original_file:
        original.save(args.original_file)
    return original


def run_seed(args, seed, original, pruned_of, data):
    x, y, test_x, test_y, reference = data
    rows = []

    def record(method, model, seconds):
        if method not in args.methods:
            return
        row = dict(seed=seed, method=method, seconds=seconds)
        row.update(measure(model, reference, test_x, test_y))
        rows.append(row)
        print(json.dumps(row), flush=True)

    record("original", original, 0.0)
    record("original int8", ksd.pruning.quantize(original, "int8"), 0.0)
    record("none", pruned_of(), 0.0)
    kl = ksd.terms.Distillation(
        original, loss="kl", reduction="mean_with_sample_weight"
    )
    students = {}
    for method, terms in (
        ("ce", []),
        ("kd", [kl]),
        ("self_data", [ksd.recipes.self_data(original, LENGTH // 2)]),
    ):
        if method not in args.methods and (
            method != "kd" or not {m for m in args.methods if "kd " in m}
        ):
            continue
        students[method] = pruned_of()
        seconds = train(students[method], terms, args.steps, x, y, seed)
        record(method, students[method], seconds)
    if "scratch" in args.methods:
        scratch = causal_lm(2, seed=seed + 1000)
        steps = args.original_steps + args.steps
        seconds = train(scratch, [], steps, x, y, seed)
        record("scratch", scratch, seconds)
    if "kd" not in students:
        return rows
    record("kd int8", ksd.pruning.quantize(students["kd"], "int8"), 0.0)
    if "kd int8 + LoRA kd" in args.methods:
        keras.utils.set_random_seed(seed)
        # KerasHub's int8 head passes no gradient to its inputs
        # (`ksd.pruning.quantize`'s docstring): the embedding stays float.
        adapted = ksd.pruning.quantize(
            students["kd"], "int8", lora_rank=8, exclude=["token_embedding"]
        )
        seconds = train(adapted, [kl], args.steps, x, y, seed)
        record("kd int8 + LoRA kd", adapted, seconds)
    return rows


def table(rows):
    lines = [
        "| model | held-out perplexity | KL to original (nats/token) "
        "| params | `.keras` bytes | training s |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        chosen = [r for r in rows if r["method"] == method]
        if not chosen:
            continue
        ppl = mean_se([r["perplexity"] for r in chosen])
        kl = mean_se([r["kl_to_original"] for r in chosen])
        seconds = mean_se([r["seconds"] for r in chosen])
        lines.append(
            f"| {method} | {ppl[0]:.3f} ± {ppl[1]:.3f} "
            f"| {kl[0]:.4f} ± {kl[1]:.4f} | {chosen[0]['params']:,} "
            f"| {chosen[0]['bytes']:,} | {seconds[0]:.0f} ± {seconds[1]:.0f} |"
        )
    lines += ["", "Paired differences in perplexity (mean ± s.e.):"]
    seeds = sorted({r["seed"] for r in rows})
    for baseline in ("ce", "self_data", "scratch"):
        diffs = []
        for seed in seeds:
            by = {
                r["method"]: r["perplexity"] for r in rows if r["seed"] == seed
            }
            if "kd" in by and baseline in by:
                diffs.append(by["kd"] - by[baseline])
        mean, se = mean_se(diffs)
        lines.append(
            f"- kd − {baseline} = {mean:+.3f} ± {se:.3f} ({len(diffs)} seeds)"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original-file", default=None)
    parser.add_argument("--original-steps", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        metavar="METHOD",
        help=f"rows to measure, from: {', '.join(METHODS)}",
    )
    parser.add_argument("--log", help="append each row here as a JSON line")
    parser.add_argument(
        "--table", nargs="+", metavar="LOG", help="print these logs' table"
    )
    args = parser.parse_args(argv)
    if args.table:
        print(table(read_logs(args.table)))
        return
    train_tokens, held_out = LM.corpus(args.limit)
    x, y = LM.windows(train_tokens, LENGTH)
    test_x, test_y = [a[:2000] for a in LM.windows(held_out, LENGTH)]
    original = original_model(args, x, y)
    original.trainable = False
    reference = log_probs(original, test_x, as_inputs=inputs)
    calibration = x[np.random.default_rng(0).choice(len(x), 64, False)]
    scores = ksd.pruning.backbone_scores(original.backbone, inputs(calibration))
    print("layer scores", np.round(scores["layers"], 4).tolist(), flush=True)

    def pruned_of():
        backbone = ksd.pruning.prune_backbone(
            original.backbone, num_layers=2, scores=scores
        )
        return keras_hub.models.GPT2CausalLM(
            backbone=backbone, preprocessor=None
        )

    rows = []
    data = (x, y, test_x, test_y, reference)
    for seed in args.seeds:
        seed_rows = run_seed(args, seed, original, pruned_of, data)
        rows += seed_rows
        if args.log:
            append_log(args.log, seed_rows)
    print(table(rows))


if __name__ == "__main__":
    main()
