"""Auxiliary exits: classifier heads on intermediate layers of a student.

`attach_exits` returns a training model that shares every weight with the
student and adds one small head per named layer; one forward pass gives the
student's output and every exit's logits. `terms.AuxiliaryExits` trains the
heads (labels plus the deepest exit as a teacher, Be Your Own Teacher), and
`EarlyExit` answers each sample from the first exit confident enough.

References:
- [Zhang et al., 2019](https://arxiv.org/abs/1905.08094) (Be Your Own
  Teacher, BYOT)
- [Teerapittayanon et al., 2016](https://arxiv.org/abs/1709.01686)
  (BranchyNet early exits)
"""

import weakref

import keras
import numpy as np
from keras import ops

from keras_selfdistill import _internals
from keras_selfdistill._forward import DEEPEST_FEATURES
from keras_selfdistill._forward import OUTPUT
from keras_selfdistill._forward import graph_taps
from keras_selfdistill._forward import is_graph

_FEATURES = "_features"


def check_head(head):
    """Raises unless `head` names a built-in head or is a head factory."""
    built_in = isinstance(head, str) and head in ("linear", "bottleneck")
    factory = callable(head) and not isinstance(head, (str, keras.layers.Layer))
    if head is not None and not built_in and not factory:
        raise ValueError(
            "`head` must be None, 'linear', 'bottleneck' or a callable "
            "`head(name, feature_shape, num_classes)` returning a layer. "
            f"Received: head={head!r}"
        )


def features_key(exit_name):
    """The key of an exit's pooled features in the exits' outputs."""
    return exit_name + _FEATURES


def attach_exits(
    student,
    layer_names,
    head=None,
    num_classes=None,
    features=False,
    output_key=OUTPUT,
    name=None,
):
    """Adds a classifier head on each named layer of the student.

    The returned model shares all of the student's weights: training it
    trains the student. Calling it returns a dict with the student's output
    under `"output"` and each exit's logits under its layer name, all from
    one forward pass. `distiller.student` (or `student`) stays the plain
    model, without heads.

    Functional and Sequential students are tapped by layer name. A
    subclassed student cannot be tapped from outside: make its `call`
    return a dict holding the logits under `output_key` and each feature
    map to put an exit on under its own key (and, for feature hints, the
    features that feed the final classifier under `"deepest_features"`).

    Args:
        student: The `keras.Model` to add exits to (built).
        layer_names: Names of the layers (or, for a subclassed student,
            dict keys) to put an exit on, shallowest first.
        head: `None` or `"linear"` (global average pooling over spatial
            axes, then a `Dense` to the classes), `"bottleneck"` (BYOT's
            head: for feature maps a 1×1 and a strided 3×3 convolution with
            batch normalization before the pooling; for vectors a hidden
            `Dense`), or a callable `head(name, feature_shape, num_classes)`
            returning a Keras layer that maps the features to logits.
            Defaults to `None` (`"linear"`).
        num_classes: Number of classes. Defaults to `None` (the width of
            the student's output; required for a subclassed student).
        features: Whether to also return each exit's pooled features
            (`"<name>_features"`) and the deepest features, for feature
            hints. Defaults to `False`.
        output_key: Key of the logits in a subclassed student's output
            dict. Defaults to `"output"`.
        name: Name of the model. Defaults to `"exits"`.

    Returns:
        An `Exits` model.

    Example:

    ```python
    exits = keras_selfdistill.exits.attach_exits(
        student, ["block1_out", "block2_out"], head="bottleneck")
    outputs = exits(images)   # {"output": ..., "block1_out": ..., ...}
    ```
    """
    if not isinstance(student, keras.Model):
        raise TypeError(
            "`attach_exits` needs a `keras.Model` student. "
            f"Received: student={student!r}"
        )
    if isinstance(layer_names, str) or not isinstance(
        layer_names, (list, tuple)
    ):
        raise TypeError(
            "`layer_names` must be a list of layer names. "
            f"Received: layer_names={layer_names!r}"
        )
    if not layer_names:
        raise ValueError(
            "`layer_names` is empty: name at least one layer to put an exit "
            "on. Received: layer_names=[]"
        )
    if len(set(layer_names)) != len(layer_names):
        raise ValueError(
            "Each layer may carry one exit. "
            f"Received: layer_names={list(layer_names)}"
        )
    check_head(head)
    return Exits(
        student,
        list(layer_names),
        head=head,
        num_classes=num_classes,
        features=features,
        output_key=output_key,
        name=name,
    )


class Exits(keras.Model):
    """A student with exit heads on intermediate layers; see `attach_exits`.

    Attributes:
        student: The wrapped student (no heads).
        exit_names: The exits, shallowest first.
        heads: Dict of exit name to head layer.
        num_classes: Number of classes of every exit.
    """

    def __init__(
        self,
        student,
        layer_names,
        head=None,
        num_classes=None,
        features=False,
        output_key=OUTPUT,
        name=None,
    ):
        super().__init__(name=name or "exits")
        self.student = student
        self.exit_names = list(layer_names)
        self.features = bool(features)
        self.output_key = output_key
        self.head_kind = head if isinstance(head, str) else None
        self.graph = None
        if is_graph(student):
            self._build_graph(head, num_classes)
        else:
            if num_classes is None:
                raise ValueError(
                    f"The student '{student.name}' is subclassed, so the "
                    "number of classes cannot be read from its layers. Pass "
                    "`num_classes`. Received: num_classes=None"
                )
            self.num_classes = int(num_classes)
            self.heads = {
                n: _make_head(head, n, None, self.num_classes)
                for n in self.exit_names
            }

    def _build_graph(self, head, num_classes):
        student = self.student
        valid = [
            layer.name
            for layer in student.layers
            if not isinstance(layer, keras.layers.InputLayer)
        ]
        unknown = [n for n in self.exit_names if n not in valid]
        if unknown:
            raise ValueError(
                f"The student '{student.name}' has no layer named "
                f"{unknown}. Valid names: {valid}. "
                f"Received: layer_names={self.exit_names}"
            )
        order = [valid.index(n) for n in self.exit_names]
        if order != sorted(order):
            raise ValueError(
                "List the exits shallowest first (in the student's layer "
                f"order {valid}). Received: layer_names={self.exit_names}"
            )
        output = student.outputs[0] if len(student.outputs) == 1 else None
        if output is None or len(output.shape) != 2:
            raise ValueError(
                f"Exits need a student with one `(batch, classes)` output. "
                f"Received: outputs {[tuple(o.shape) for o in student.outputs]}"
            )
        self.num_classes = int(num_classes or output.shape[-1])
        outputs = {OUTPUT: output}
        self.heads = {}
        for name in self.exit_names:
            tapped = student.get_layer(name).output
            if isinstance(tapped, (list, tuple)):
                raise ValueError(
                    f"Layer '{name}' has several outputs; put the exit on a "
                    f"layer with one. Received: {len(tapped)} outputs"
                )
            self.heads[name] = _make_head(
                head, name, tuple(tapped.shape), self.num_classes
            )
            outputs[name] = self.heads[name](tapped)
            if self.features:
                outputs[features_key(name)] = pool(tapped)
        if self.features:
            deepest = graph_taps(student, [DEEPEST_FEATURES])
            outputs[DEEPEST_FEATURES] = pool(deepest[DEEPEST_FEATURES])
        self.graph = keras.Model(student.input, outputs, name="graph")

    def call(self, inputs, training=None):
        if self.graph is not None:
            return self.graph(inputs, training=training)
        student_outputs = self.student(inputs, training=training)
        if not isinstance(student_outputs, dict):
            raise ValueError(
                f"The subclassed student '{self.student.name}' must return a "
                f"dict with its logits under '{self.output_key}' and the "
                f"exits' features under {self.exit_names}. Received: "
                f"outputs of type {type(student_outputs).__name__}"
            )
        needed = [self.output_key] + self.exit_names
        if self.features:
            needed.append(DEEPEST_FEATURES)
        missing = [k for k in needed if k not in student_outputs]
        if missing:
            raise ValueError(
                f"The subclassed student '{self.student.name}' returned no "
                f"{missing}. Received: keys {sorted(student_outputs)}"
            )
        outputs = {OUTPUT: student_outputs[self.output_key]}
        for name in self.exit_names:
            outputs[name] = self.heads[name](
                student_outputs[name], training=training
            )
            if self.features:
                outputs[features_key(name)] = pool(student_outputs[name])
        if self.features:
            outputs[DEEPEST_FEATURES] = pool(student_outputs[DEEPEST_FEATURES])
        return outputs

    def final(self, inputs, training=None):
        """The student's own output (its logits), without the heads."""
        outputs = self.student(inputs, training=training)
        if self.graph is None:
            return outputs[self.output_key]
        return outputs

    def export(self, exit_name):
        """A standalone model: the student up to the exit, then its head.

        The model is plain Keras (standard layers only for the built-in
        heads): it saves to a `.keras` file that loads with
        `safe_mode=True` without this library.

        Args:
            exit_name: One of `exit_names`.

        Returns:
            A Functional `keras.Model` sharing the student's weights.
        """
        if exit_name not in self.exit_names:
            raise ValueError(
                f"Unknown exit. Valid exits: {self.exit_names}. "
                f"Received: exit_name={exit_name!r}"
            )
        if self.graph is None:
            raise ValueError(
                "Only the exits of a Functional or Sequential student can be "
                "exported as a truncated model; the layers of the "
                f"subclassed student '{self.student.name}' cannot be cut."
            )
        tapped = self.student.get_layer(exit_name).output
        return keras.Model(
            self.student.input,
            self.heads[exit_name](tapped),
            name=f"{self.student.name}_{exit_name}",
        )


def _make_head(head, name, feature_shape, num_classes):
    if callable(head) and not isinstance(head, str):
        layer = head(name, feature_shape, num_classes)
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                "A `head` factory must return a Keras layer. Received: "
                f"{layer!r} from head({name!r}, {feature_shape}, "
                f"{num_classes})"
            )
        return layer
    layers = []
    rank = None if feature_shape is None else len(feature_shape)
    if head == "bottleneck":
        if rank is not None and rank > 2:
            channels = feature_shape[-1]
            conv = {
                1: keras.layers.Conv1D,
                2: keras.layers.Conv2D,
                3: keras.layers.Conv3D,
            }[rank - 2]
            layers += [
                conv(channels, 1, use_bias=False),
                keras.layers.BatchNormalization(),
                keras.layers.ReLU(),
                conv(channels, 3, strides=2, padding="same", use_bias=False),
                keras.layers.BatchNormalization(),
                keras.layers.ReLU(),
            ]
        else:
            width = feature_shape[-1] if feature_shape else 128
            layers.append(keras.layers.Dense(width, activation="relu"))
    # Standard pooling layers keep an exported exit loadable without the
    # library; only a subclassed student's heads (rank unknown) use _Pool.
    pooling = {
        None: _Pool,
        3: keras.layers.GlobalAveragePooling1D,
        4: keras.layers.GlobalAveragePooling2D,
        5: keras.layers.GlobalAveragePooling3D,
    }.get(rank)
    if pooling is not None:
        layers.append(pooling())
    layers.append(keras.layers.Dense(num_classes, name="logits"))
    return keras.Sequential(layers, name=f"{name}_exit")


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class _Pool(keras.layers.Layer):
    """Global average pooling over every axis between batch and channels."""

    def call(self, inputs):
        return pool(inputs)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


def pool(tensor):
    """Global average pooling over every axis between batch and channels."""
    if len(tensor.shape) <= 2:
        return tensor
    return ops.mean(tensor, axis=tuple(range(1, len(tensor.shape) - 1)))


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


class _Cut:
    """The student cut into segments at its exits, and the exits' heads."""

    def __init__(self, exits):
        student = exits.student
        tensors = [student.get_layer(n).output for n in exits.exit_names]
        starts = [student.input] + tensors
        ends = tensors + [student.outputs[0]]
        self.num_classes = exits.num_classes
        self.segments = []
        for index, (start, end) in enumerate(zip(starts, ends)):
            try:
                segment = keras.Model(start, end)
            except ValueError as error:
                before = (
                    "the input" if index == 0 else exits.exit_names[index - 1]
                )
                raise ValueError(
                    "Cannot cut the student between "
                    f"{before} and the next exit: the graph there reads "
                    "layers from before the cut (a skip connection across "
                    "an exit). Put exits at block boundaries."
                ) from error
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
