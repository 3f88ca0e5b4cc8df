"""Early-exit inference: each sample answered by the first confident exit.

References:

- [Teerapittayanon et al., 2016](https://arxiv.org/abs/1709.01686)
  (BranchyNet early exits)
"""

import weakref

import keras
import numpy as np
from keras import ops

from keras_selfdistill import _internals
from keras_selfdistill.exits.exits import Exits


class EarlyExit:
    """Answers each sample from the first exit confident enough.

    The student is cut at its exits into segments. A batch runs through the
    first segment and the first head; samples whose top softmax probability
    reaches `threshold` take that exit's answer, and only the others run
    through the next segment. Samples that no exit takes get the student's
    own output.

    The segments are cut from a Functional or Sequential student; the graph
    between two exits must not read a layer before the first of them (no
    skip connection across an exit).

    Args:
        exits: An `Exits` model (from `attach_exits`, or
            `distiller.exits` after training).
        threshold: Softmax confidence in `(0, 1]` at which an exit answers.
            `1.0` sends (almost) every sample to the end.

    Example:

    ```python
    early = keras_selfdistill.exits.EarlyExit(distiller.exits, threshold=0.9)
    logits, exit_index = early(x_test)   # exit_index == 2: the last exit
    ```
    """

    def __init__(self, exits, threshold=0.9):
        if not isinstance(exits, Exits):
            raise TypeError(
                "`EarlyExit` needs the `Exits` model from `attach_exits` "
                f"(or `distiller.exits`). Received: exits={exits!r}"
            )
        if exits.graph is None:
            raise ValueError(
                "Early exits cut the student into segments, which needs a "
                "Functional or Sequential student; "
                f"'{exits.student.name}' is subclassed."
            )
        if isinstance(threshold, bool) or not 0.0 < float(threshold) <= 1.0:
            raise ValueError(
                "`threshold` must be a probability in (0, 1]. "
                f"Received: threshold={threshold!r}"
            )
        self.exits = exits
        self.threshold = float(threshold)
        self._cut = _cut(exits)

    def __call__(self, x):
        """Returns `(logits, exit_index)` as NumPy arrays.

        `exit_index[i]` is the exit that answered sample `i`: `0` for the
        shallowest, `len(exit_names)` for the student's own output.
        """
        if self._cut.fused is not None:
            logits, which = self._cut.fused(x, self._threshold_tensor())
            return logits.numpy(), which.numpy()
        return self._run_eager(x)

    def _threshold_tensor(self):
        import tensorflow as tf

        return tf.constant(self.threshold, "float32")

    def _run_eager(self, x):
        return self._cut.run_eager(x, self.threshold)


# One cut per exits model, shared by every threshold: the threshold is an
# argument of the compiled function, so comparing thresholds traces once.
_CUTS = weakref.WeakKeyDictionary()


def _cut(exits):
    if exits not in _CUTS:
        _CUTS[exits] = _Cut(exits)
    return _CUTS[exits]


def _skip_connection(before):
    return ValueError(
        f"Cannot cut the student between {before} and the next exit: the "
        "graph there reads layers from before the cut (a skip connection "
        "across an exit). Put exits at block boundaries."
    )


class _Cut:
    """The student cut into segments at its exits, and the exits' heads."""

    def __init__(self, exits):
        student = exits.student
        tensors = [student.get_layer(n).output for n in exits.exit_names]
        starts = [student.input] + tensors
        ends = tensors + [student.outputs[0]]
        self.num_classes = exits.num_classes
        self.segments = []
        earlier = set()
        for index, (start, end) in enumerate(zip(starts, ends)):
            before = "the input" if index == 0 else exits.exit_names[index - 1]
            try:
                segment = keras.Model(start, end)
            except ValueError as error:
                raise _skip_connection(before) from error
            # Older Keras (3.10) builds such a segment from the layers
            # before the cut instead of refusing it.
            layers = {
                id(layer)
                for layer in segment.layers
                if not isinstance(layer, keras.layers.InputLayer)
            }
            if layers & earlier:
                raise _skip_connection(before)
            earlier |= layers
            self.segments.append(segment)
        self.heads = [exits.heads[n] for n in exits.exit_names]
        self.fused = None
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            # One compiled call per batch: Python round trips between the
            # segments would cost more than a small network's layers.
            self.fused = tf.function(self.run_graph, reduce_retracing=True)

    def run_graph(self, x, threshold):
        import tensorflow as tf

        count = tf.shape(tf.nest.flatten(x)[0])[0]
        logits = tf.zeros((count, self.num_classes), "float32")
        which = tf.fill((count,), tf.constant(len(self.heads), "int64"))
        return self._stage(0, x, tf.range(count), logits, which, threshold)

    def _stage(self, index, hidden, remaining, logits, which, threshold):
        import tensorflow as tf

        hidden = self.segments[index](hidden, training=False)
        if index == len(self.heads):
            final = tf.cast(hidden, "float32")
            logits = tf.tensor_scatter_nd_update(
                logits, remaining[:, None], final
            )
            return logits, which
        exit_logits = tf.cast(
            self.heads[index](hidden, training=False), "float32"
        )
        confidence = tf.reduce_max(tf.nn.softmax(exit_logits), axis=-1)
        done = confidence >= threshold
        rows = tf.boolean_mask(remaining, done)[:, None]
        logits = tf.tensor_scatter_nd_update(
            logits, rows, tf.boolean_mask(exit_logits, done)
        )
        which = tf.tensor_scatter_nd_update(
            which,
            rows,
            tf.fill(tf.shape(rows)[:1], tf.constant(index, "int64")),
        )
        keep = tf.logical_not(done)
        remaining = tf.boolean_mask(remaining, keep)
        hidden = tf.boolean_mask(hidden, keep)
        # The next segment runs only if a sample is left.
        return tf.cond(
            tf.size(remaining) > 0,
            lambda: self._stage(
                index + 1, hidden, remaining, logits, which, threshold
            ),
            lambda: (logits, which),
        )

    def run_eager(self, x, threshold):
        first = x[0] if isinstance(x, (list, tuple)) else x
        count = int(np.shape(first)[0])
        logits = np.zeros((count, self.num_classes), "float32")
        which = np.full(count, len(self.heads), "int64")
        remaining = np.arange(count)
        hidden = x
        for index, segment in enumerate(self.segments):
            hidden = segment(hidden, training=False)
            if index == len(self.heads):
                logits[remaining] = _internals.to_numpy(hidden)
                break
            exit_logits = _internals.to_numpy(
                self.heads[index](hidden, training=False)
            )
            confidence = _max_softmax(exit_logits)
            done = confidence >= threshold
            logits[remaining[done]] = exit_logits[done]
            which[remaining[done]] = index
            if done.all():
                break
            if done.any():
                keep = np.flatnonzero(~done)
                remaining = remaining[keep]
                hidden = ops.take(hidden, keep, axis=0)
        return logits, which


def _max_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted)
    return (probs / probs.sum(axis=-1, keepdims=True)).max(axis=-1)


def early_exit_tradeoff(
    exits,
    x,
    y,
    thresholds=(0.5, 0.8, 0.9, 0.95, 0.99, 1.0),
    batch_size=256,
    repeats=3,
):
    """Measures accuracy, exit depth and latency of early exit per threshold.

    For each threshold, `EarlyExit` answers `x` batch by batch; the full
    student (one compiled call per batch on TensorFlow, as `EarlyExit`)
    is the reference row. Timings are interleaved (full, each threshold,
    then again) and the median of `repeats` passes over `x` is kept, so a
    drift in machine speed hits every row alike.

    Args:
        exits: An `Exits` model (`distiller.exits` after training).
        x: Test inputs (an array).
        y: Integer test labels.
        thresholds: Softmax confidences at which an exit answers. Defaults
            to `(0.5, 0.8, 0.9, 0.95, 0.99, 1.0)`.
        batch_size: Samples per call; `1` measures per-request latency.
            Defaults to `256`.
        repeats: Timed passes per row. Defaults to `3`.

    Returns:
        A list of dicts, the full student first (`threshold` `None`), with
        `threshold`, `accuracy`, `mean_depth` (mean exit index: 0 for the
        first exit, `len(exit_names)` for the student's output),
        `exit_counts` (samples answered by each exit, then by the output)
        and `latency` (seconds per sample).

    Example:

    ```python
    table = keras_selfdistill.exits.early_exit_tradeoff(
        distiller.exits, x_test, y_test, thresholds=(0.9, 0.99))
    keras_selfdistill.plots.early_exit_tradeoff(table)
    ```
    """
    import statistics
    import time

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(
            f"`repeats` must be an int >= 1. Received: repeats={repeats!r}"
        )
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or (batch_size < 1)
    ):
        raise ValueError(
            "`batch_size` must be an int >= 1. "
            f"Received: batch_size={batch_size!r}"
        )
    y = np.asarray(y).reshape(-1)
    if len(y) != len(x):
        raise ValueError(
            f"`x` and `y` must hold as many samples. Received: {len(x)} "
            f"inputs and {len(y)} labels"
        )
    runners = [None] + [EarlyExit(exits, t) for t in thresholds]
    student = exits.student

    def forward(batch):
        return student(batch, training=False)

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # Compiled, as `EarlyExit` is: the reference pays no Python loop.
        forward = tf.function(forward, reduce_retracing=True)
    last = len(exits.exit_names)

    def full(batch):
        logits = _internals.to_numpy(forward(batch))
        return logits, np.full(len(logits), last, "int64")

    calls = [full if r is None else r for r in runners]
    batches = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    outputs = []
    for call in calls:
        # Also the warm-up: every function traced on every batch shape.
        results = [call(batch) for batch in batches]
        outputs.append(
            tuple(np.concatenate([r[k] for r in results]) for k in (0, 1))
        )
    seconds = [[] for _ in calls]
    for _ in range(repeats):
        for index, call in enumerate(calls):
            start = time.perf_counter()
            for batch in batches:
                call(batch)
            seconds[index].append(time.perf_counter() - start)
    table = []
    for runner, (logits, which), times in zip(runners, outputs, seconds):
        table.append(
            {
                "threshold": None if runner is None else runner.threshold,
                "accuracy": float(np.mean(np.argmax(logits, -1) == y)),
                "mean_depth": float(np.mean(which)),
                "exit_counts": np.bincount(
                    which, minlength=len(exits.exit_names) + 1
                ).tolist(),
                "latency": statistics.median(times) / len(y),
            }
        )
    return table
