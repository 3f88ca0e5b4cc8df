"""`attach_exits` and the `Exits` model: heads on a student's layers.

`attach_exits` returns a training model that shares every weight with the
student and adds one small head per named layer; one forward pass gives the
student's output and every exit's logits.
"""

import keras
from keras import ops

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
