"""Distil a byte-level causal LM into a smaller one on real text: CE, KD, GKD.

The text is the Python standard library's own source files, which every
Python install has (no download): files are sorted by path, every tenth
is held out, and the bytes are the tokens (a vocabulary of 256). A
transformer teacher is trained with cross-entropy; then, at the same
number of optimizer steps, a smaller student is trained three ways:

- `ce`: cross-entropy on the text alone;
- `kd`: off-policy token-level KD, the generalized JSD (β = 0.5) between
  teacher and student on the text's windows;
- `gkd`: the same divergence, half of the steps (GKD's λ = 0.5) on the
  student's own continuations of the windows' first halves
  (`keras_selfdistill.terms.OnPolicy`);
- `kd_kl` (with `--methods`): off-policy KD with the forward KL instead;
- `taid` (with `--methods`): TAID, the cross-entropy to an interpolation
  of the student's and the teacher's logits whose coefficient moves from
  0.4 to 1 over the steps, adaptively (`keras_selfdistill.terms.TAID`,
  the official defaults);
- `kd_kl_fused` (with `--methods`): `kd_kl` computed by
  `keras_selfdistill.terms.FusedDistillation`, fused with the heads, which
  never builds the `[tokens, vocabulary]` logits.

With `--vocabulary N` (N > 256) the tokens are not bytes but the pieces
of a SentencePiece model of N pieces trained on the training text as
KerasHub's `compute_sentence_piece_proto` trains one (locally, no
download), and the bits are per piece.

Each reports the held-out perplexity (bits per byte too), the teacher's
perplexity of the student's own continuations of held-out prompts (what
GKD trains for), training throughput in tokens per second, and the peak
resident memory while the student trains (on Linux, that of the training
alone; run one method per process to compare methods' memory):

    python examples/language_model.py                   # 3 seeds, ~35 min
    python examples/language_model.py --steps 50 --seeds 0 --limit 200000
    python examples/language_model.py --vocabulary 32000 --limit 10000000 \
        --methods kd_kl,kd_kl_fused --seeds 0 --steps 200 --teacher-steps 300
"""

import argparse
import json
import math
import os
import resource
import sys
import sysconfig
import time

import keras
import numpy as np

import keras_selfdistill as ksd
from keras_selfdistill.terms.on_policy import continue_sequences

VOCABULARY = 256


def corpus(limit=None, vocabulary=VOCABULARY):
    """`(train, held_out)` token arrays of the standard library's sources:
    bytes, or with `vocabulary` above 256 SentencePiece pieces."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "test"))
        paths += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    train, held_out = [], []
    for i, path in enumerate(sorted(paths)):
        with open(path, "rb") as file:
            (held_out if i % 10 == 9 else train).append(file.read())
    train, held_out = b"".join(train), b"".join(held_out)
    if limit:
        train, held_out = train[:limit], held_out[: max(limit // 10, 4096)]
    if vocabulary != VOCABULARY:
        encode = sentence_pieces(train, vocabulary)
        return encode(train), encode(held_out)
    return (
        np.frombuffer(train, np.uint8).astype("int32"),
        np.frombuffer(held_out, np.uint8).astype("int32"),
    )


def sentence_pieces(text, vocabulary):
    """An encoder into the pieces of a SentencePiece model of `vocabulary`
    pieces, trained on `text`'s lines (locally, no download).

    Trained with the settings of KerasHub's `compute_sentence_piece_proto`
    (NFKC, ids 0–3 for padding, unknown, start and end) by the
    `sentencepiece` trainer directly: KerasHub's wrapper and its tokenizer
    layer require `tensorflow-text`, which this project does not install.
    The model is BPE, not KerasHub's default unigram: on 5 MB of this
    text a unigram model stops at 19,354 pieces.
    """
    import io

    import sentencepiece

    lines = [line for line in text.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocabulary,
        model_type="bpe",
        normalization_rule_name="nmt_nfkc",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        minloglevel=2,
    )
    processor = sentencepiece.SentencePieceProcessor(
        model_proto=model.getvalue()
    )

    def encode(data):
        pieces = processor.encode(data.decode("utf-8", "replace").splitlines())
        return np.concatenate([np.asarray(p, "int32") for p in pieces if p])

    return encode


def windows(tokens, length):
    """Non-overlapping `(x, y)` windows: `y` is `x` shifted by one token."""
    count = (len(tokens) - 1) // length
    x = tokens[: count * length].reshape(count, length)
    y = tokens[1 : count * length + 1].reshape(count, length)
    return x, y


@keras.saving.register_keras_serializable(package="examples")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector per position."""

    def build(self, input_shape):
        self.table = self.add_weight(
            shape=tuple(input_shape[1:]), initializer="glorot_uniform"
        )

    def call(self, inputs):
        return inputs + self.table[None]


def transformer(length, width, depth, heads, name, seed, vocabulary=VOCABULARY):
    """A pre-norm causal transformer from token ids to next-token logits."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((length,), dtype="int32")
    h = PositionEmbedding()(keras.layers.Embedding(vocabulary, width)(tokens))
    for _ in range(depth):
        a = keras.layers.LayerNormalization()(h)
        a = keras.layers.MultiHeadAttention(heads, width // heads)(
            a, a, use_causal_mask=True
        )
        h = h + a
        f = keras.layers.LayerNormalization()(h)
        f = keras.layers.Dense(4 * width, activation="gelu")(f)
        h = h + keras.layers.Dense(width)(f)
    h = keras.layers.LayerNormalization()(h)
    return keras.Model(tokens, keras.layers.Dense(vocabulary)(h), name=name)


def _ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _nll(model, x, y, batch_size=64):
    """The negative log-likelihood of each next token, a batch at a time
    (a 32k vocabulary's logits of every window would not fit)."""
    values = []
    for start in range(0, len(x), batch_size):
        logits = model.predict_on_batch(x[start : start + batch_size])
        logits = np.asarray(logits, "float64")
        top = logits.max(-1, keepdims=True)
        log_sum = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
        picked = np.take_along_axis(
            logits, y[start : start + batch_size, ..., None], -1
        )[..., 0]
        values.append(log_sum - picked)
    return np.concatenate(values)


def perplexity(model, x, y):
    """Held-out perplexity and bits per token of next-token predictions."""
    nll = np.mean(_nll(model, x, y))
    return math.exp(nll), nll / math.log(2)


def teacher_perplexity_of_samples(student, teacher, x, seed):
    """The teacher's perplexity of the student's own continuations.

    The student continues the first half of each window (temperature 1);
    the teacher scores the generated half. GKD trains for this: text the
    student writes that the teacher finds likely.
    """
    half = x.shape[1] // 2
    noise = np.random.default_rng(seed).uniform(size=x.shape)
    # 100 windows at a time: every generated token runs the student on
    # whole windows, `[100, length, vocabulary]` logits (0.8 GB at 32k).
    written = np.concatenate(
        [
            keras.ops.convert_to_numpy(
                continue_sequences(
                    lambda t: student(t, training=False),
                    x[start : start + 100],
                    half,
                    1.0,
                    noise[start : start + 100],
                )
            )
            for start in range(0, len(x), 100)
        ]
    )
    # Position p predicts token p + 1: the generated tokens are predicted
    # at positions half − 1 … length − 2 (the last target is a filler).
    following = np.pad(written[:, 1:], ((0, 0), (0, 1)))
    nll = _nll(teacher, written, following)[:, half - 1 : -1]
    return math.exp(np.mean(nll))


def _memory(field):
    """A `/proc/self/status` field in MB (Linux), or `None`."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _restart_peak_memory():
    """Restarts the process's peak resident memory at what it holds now
    (Linux's `clear_refs`), so that the peak read after training is the
    training's, not the evaluations' before it; returns that memory."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        return None
    return _memory("VmRSS")


def _peak_memory():
    """The peak resident memory (MB) since the last restart; elsewhere
    than on Linux, the process's peak so far."""
    peak = _memory("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if sys.platform == "darwin":
            peak /= 1024
    return peak


def _batches(x, y, batch_size, steps, seed):
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(x), size=(steps, batch_size))
    return x[index.reshape(-1)], y[index.reshape(-1)]


def train_teacher(args, x, y):
    print(f"training the teacher ({args.teacher_steps} steps)", flush=True)
    teacher = transformer(
        args.length, 128, 2, 4, "teacher", seed=100, vocabulary=args.vocabulary
    )
    teacher.compile(optimizer=keras.optimizers.Adam(1e-3), loss=_ce())
    bx, by = _batches(x, y, args.batch_size, args.teacher_steps, seed=100)
    teacher.fit(bx, by, batch_size=args.batch_size, epochs=1, verbose=0)
    return teacher


def train_student(args, method, teacher, x, y, seed):
    student = transformer(
        args.length, 64, 1, 2, "student", seed=seed, vocabulary=args.vocabulary
    )
    divergence = ksd.terms.Distillation(
        teacher,
        loss="jsd",
        beta=0.5,
        reduction="mean_with_sample_weight",
    )
    if method == "kd_kl":
        # Forward KL, the likelihood-aligned divergence (GKD's "supervised
        # KD" baseline).
        divergence = ksd.terms.Distillation(
            teacher, loss="kl", reduction="mean_with_sample_weight"
        )
    if method == "kd_kl_fused":
        divergence = ksd.terms.FusedDistillation(
            teacher, loss="kl", reduction="mean_with_sample_weight"
        )
    if method == "taid":
        divergence = ksd.terms.TAID(
            teacher,
            total_steps=args.steps,
            reduction="mean_with_sample_weight",
        )
    terms, loss = [], _ce()
    if method in ("kd", "gkd", "kd_kl", "taid", "kd_kl_fused"):
        terms, loss = [divergence], None
    if method == "gkd":
        terms.append(
            ksd.terms.OnPolicy(
                prompt_length=args.length // 2, fraction=0.5, seed=seed
            )
        )
    distiller = ksd.Distiller(student, terms)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    bx, by = _batches(x, y, args.batch_size, args.steps, seed=seed)
    start = time.perf_counter()
    distiller.fit(bx, by, batch_size=args.batch_size, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    return distiller.student, bx.size / seconds


METHODS = ("ce", "kd", "gkd", "kd_kl", "taid", "kd_kl_fused")


class _Help(
    argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter
):
    """The docstring as written, and every option's default."""


def _methods(text):
    methods = text.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(
            f"methods are chosen from {', '.join(METHODS)}; got {text!r}"
        )
    return methods


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    parser.add_argument(
        "--steps", type=int, default=600, help="optimizer steps per student"
    )
    parser.add_argument(
        "--teacher-steps", type=int, default=2000, help="teacher's steps"
    )
    parser.add_argument(
        "--teacher-file", help="a saved teacher (.keras) to load or create"
    )
    parser.add_argument(
        "--seeds", default="0,1,2", help="comma-separated student seeds"
    )
    parser.add_argument(
        "--methods",
        default="ce,kd,gkd",
        type=_methods,
        help=f"comma-separated, from {', '.join(METHODS)}: cross-entropy "
        "alone, token-level KD (JSD), on-policy GKD, KD with the forward "
        "KL, TAID, KD with the forward KL fused with the heads",
    )
    parser.add_argument(
        "--vocabulary",
        type=int,
        default=VOCABULARY,
        help="256: bytes; more: a SentencePiece model of this many pieces",
    )
    parser.add_argument("--length", type=int, default=64, help="window size")
    parser.add_argument("--batch-size", type=int, default=32, help="batch")
    parser.add_argument(
        "--limit", type=int, help="bytes of training text (default: all)"
    )
    parser.add_argument("--json", help="write the results to this file")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    train, held_out = corpus(args.limit, args.vocabulary)
    x, y = windows(train, args.length)
    # 2,000 held-out windows (128,000 bytes at the default length).
    test_x, test_y = [a[:2000] for a in windows(held_out, args.length)]
    if args.teacher_file and os.path.exists(args.teacher_file):
        teacher = keras.saving.load_model(args.teacher_file)
    else:
        teacher = train_teacher(args, x, y)
        if args.teacher_file:
            teacher.save(args.teacher_file)
    results = {
        # Bytes, or SentencePiece pieces with `--vocabulary`.
        "train_tokens": int(train.size),
        "held_out_tokens": int(held_out.size),
        "teacher": perplexity(teacher, test_x, test_y)[0],
    }
    print(f"teacher held-out perplexity {results['teacher']:.3f}")
    unit = "byte" if args.vocabulary == VOCABULARY else "piece"
    for method in args.methods:
        runs = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            before = _restart_peak_memory()
            student, speed = train_student(args, method, teacher, x, y, seed)
            peak = _peak_memory()
            ppl, bits = perplexity(student, test_x, test_y)
            judged = teacher_perplexity_of_samples(
                student, teacher, test_x[:500], seed
            )
            runs.append(
                {
                    "seed": seed,
                    "perplexity": ppl,
                    "bits": bits,
                    "teacher_perplexity_of_samples": judged,
                    "tokens_per_second": speed,
                    "rss_before_training_mb": before,
                    "peak_rss_mb": peak,
                }
            )
            print(
                f"{method} seed {seed}: perplexity {ppl:.3f} "
                f"({bits:.3f} bits/{unit}), teacher's perplexity of its "
                f"samples {judged:.3f}, {speed:.0f} tokens/s",
                flush=True,
            )
        results[method] = runs
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return results


if __name__ == "__main__":
    main()
