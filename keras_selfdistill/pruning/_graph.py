"""The channel groups of a Functional or Sequential model: what structured
pruning removes together.

A *group* is one space of channel indices on the last axis: the outputs of
a `Dense`, `Conv` or `Embedding` layer, or of several joined by a residual
`Add`, which must keep the same channels. Every tensor's last axis has a
*layout*, the tuple of the groups laid end to end along it: one per input
of a `Concatenate`, one per position after a `Flatten` (channels last,
the channel varies fastest). Pruning a group removes its channels from its
producers' outputs, from the per-channel weights of the layers it passes
through (`BatchNormalization`, depthwise kernels) and from the input rows
of every layer that consumes it.

A group is *fixed* where its channels are a model input or output, and
*blocked* where a layer that the analysis cannot follow (a `Lambda`, a
custom layer, a normalisation over the channels) consumes it: pruning it
is refused with that layer's name.
"""

import keras
import numpy as np

from keras_selfdistill import _internals
from keras_selfdistill.pruning.quantized import is_quantized

L = keras.layers

# New channels from a channel input: the input rows and output columns
# of these kernels are pruned.
_CONVOLUTIONS = (L.Conv1D, L.Conv2D, L.Conv3D)
_PRODUCERS = (L.Dense, L.Embedding) + _CONVOLUTIONS
# The channels pass through, each with weights of its own.
_CHANNELWISE = (
    L.BatchNormalization,
    L.DepthwiseConv1D,
    L.DepthwiseConv2D,
)
# The channels pass through, untouched as a set.
_PASSTHROUGH = (
    L.Activation,
    L.ReLU,
    L.LeakyReLU,
    L.ELU,
    L.Dropout,
    L.SpatialDropout1D,
    L.SpatialDropout2D,
    L.SpatialDropout3D,
    L.GaussianNoise,
    L.GaussianDropout,
    L.AlphaDropout,
    L.ActivityRegularization,
    L.Identity,
    L.MaxPooling1D,
    L.MaxPooling2D,
    L.MaxPooling3D,
    L.AveragePooling1D,
    L.AveragePooling2D,
    L.AveragePooling3D,
    L.GlobalAveragePooling1D,
    L.GlobalAveragePooling2D,
    L.GlobalAveragePooling3D,
    L.GlobalMaxPooling1D,
    L.GlobalMaxPooling2D,
    L.GlobalMaxPooling3D,
    L.ZeroPadding1D,
    L.ZeroPadding2D,
    L.ZeroPadding3D,
    L.Cropping1D,
    L.Cropping2D,
    L.Cropping3D,
    L.UpSampling1D,
    L.UpSampling2D,
    L.UpSampling3D,
)
# Element-wise joins: their inputs' channels must stay the same ones.
_MERGES = (L.Add, L.Subtract, L.Average, L.Maximum, L.Minimum, L.Multiply)
# Activations that normalise over the channels: pruning one changes all.
_OVER_CHANNELS = ("softmax", "log_softmax")


class Group:
    """One space of channel indices: its producers, size and state."""

    def __init__(self, size):
        self.size = size
        self.producers = []
        self.fixed = None
        self.blocked = None

    @property
    def name(self):
        return self.producers[0].name if self.producers else None

    @property
    def prunable(self):
        return bool(self.producers) and not self.fixed and not self.blocked


class Graph:
    """The groups of `model` and, per layer, the layouts it is sliced by.

    Attributes:
        groups: `{name: Group}` of the groups that have producers, in the
            order of their first producer in `model.layers`.
        layers: `{layer name: (layer, input layout, output group)}` of the
            layers with channel weights (producers and channel-wise
            layers); the input layout is `None` for an `Embedding`, the
            output group `None` for a channel-wise layer.
        consumed: `{layer name: input tensor}` of the producers that take
            channels in, for activation scores.
    """

    def __init__(self, model):
        _check_model(model)
        self.model = model
        self._parent = []
        self._groups = []
        self._layouts = {}
        self._calls = {}
        self._weighted = {}
        self.consumed = {}
        for tensor in model.outputs:
            for group in self.layout(tensor):
                self._fix(group, "it is a model output")
        order = {layer.name: i for i, layer in enumerate(model.layers)}
        roots = []
        for index in range(len(self._groups)):
            root = self.find(index)
            group = self._groups[root]
            if group.producers and root not in roots:
                roots.append(root)
        for root in roots:
            self._groups[root].producers.sort(key=lambda p: order[p.name])
        roots.sort(key=lambda r: order[self._groups[r].producers[0].name])
        self.groups = {self._groups[r].name: self._groups[r] for r in roots}
        self.layers = {
            name: (layer, layout, None if out is None else self.group(out))
            for name, (layer, layout, out) in self._weighted.items()
        }

    def find(self, index):
        while self._parent[index] != index:
            self._parent[index] = self._parent[self._parent[index]]
            index = self._parent[index]
        return index

    def group(self, index):
        return self._groups[self.find(index)]

    def layout(self, tensor):
        """The tuple of group indices along `tensor`'s last axis."""
        key = id(tensor)
        if key not in self._layouts:
            self._layouts[key] = self._trace(tensor)
        return self._layouts[key]

    def groups_of(self, layout):
        """The distinct groups of a layout, in order."""
        found = []
        for index in layout:
            group = self.group(index)
            if all(group is not other for other in found):
                found.append(group)
        return found

    def rows(self, layout, keep):
        """The indices kept along an axis laid out as `layout`, given
        `keep`, `{group name: kept indices}`."""
        rows, offset = [], 0
        for index in layout:
            group = self.group(index)
            kept = keep.get(group.name)
            if kept is None:
                kept = np.arange(group.size)
            rows.append(np.asarray(kept) + offset)
            offset += group.size
        return np.concatenate(rows) if rows else np.zeros((0,), int)

    def _new(self, size):
        self._parent.append(len(self._groups))
        self._groups.append(Group(size))
        return len(self._groups) - 1

    def _fix(self, index, reason):
        group = self.group(index)
        group.fixed = group.fixed or reason

    def _block(self, index, reason):
        group = self.group(index)
        group.blocked = group.blocked or reason

    def _union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        first, second = self._groups[a], self._groups[b]
        self._parent[b] = a
        first.producers += second.producers
        first.fixed = first.fixed or second.fixed
        first.blocked = first.blocked or second.blocked

    def _trace(self, tensor):
        call = _internals.producing_call(tensor)
        if call is None:
            raise ValueError(
                "Structured pruning follows a Functional model's graph; a "
                f"tensor of {self.model.name!r} has no producing layer. "
                "Build the model with `keras.Input`."
            )
        layer, args, kwargs = call
        inputs = [
            t
            for t in keras.tree.flatten((args, kwargs))
            if isinstance(t, keras.KerasTensor)
        ]
        if isinstance(layer, L.InputLayer):
            index = self._new(tensor.shape[-1])
            self._fix(index, f"it is the model input {layer.name!r}")
            return (index,)
        previous = self._calls.setdefault(layer.name, [id(t) for t in inputs])
        if previous != [id(t) for t in inputs]:
            raise ValueError(
                f"The layer {layer.name!r} is called more than once in "
                f"{self.model.name!r}; structured pruning cannot give its "
                "calls different channels. Prune a model that calls each "
                "layer once."
            )
        layouts = [self.layout(t) for t in inputs]
        return self._apply(layer, inputs, layouts, tensor)

    def _apply(self, layer, inputs, layouts, tensor):
        channels_last = (
            getattr(layer, "data_format", "channels_last") == "channels_last"
        )
        if isinstance(layer, _PRODUCERS) and channels_last:
            if getattr(layer, "groups", 1) != 1:
                return self._opaque(layer, layouts, tensor, "grouped")
            index = self._new(tensor.shape[-1])
            self._groups[index].producers.append(layer)
            activation = getattr(layer, "activation", None)
            if getattr(activation, "__name__", None) in _OVER_CHANNELS:
                self._block(index, _reason(layer, "normalises over them"))
            layout = None
            if not isinstance(layer, L.Embedding):
                layout = layouts[0]
                self.consumed[layer.name] = inputs[0]
            self._weighted[layer.name] = (layer, layout, index)
            return (index,)
        if isinstance(layer, _CHANNELWISE) and channels_last:
            if _channel_axis_only(layer, inputs[0]):
                self._weighted[layer.name] = (layer, layouts[0], None)
                return layouts[0]
        if isinstance(layer, _PASSTHROUGH) and channels_last:
            activation = getattr(layer, "activation", None)
            if getattr(activation, "__name__", None) not in _OVER_CHANNELS:
                return layouts[0]
        if isinstance(layer, L.Flatten) and channels_last:
            shape = inputs[0].shape[1:-1]
            if all(d is not None for d in shape):
                return layouts[0] * int(np.prod(shape, dtype=int))
        if isinstance(layer, L.Concatenate):
            rank = len(inputs[0].shape)
            if layer.axis in (-1, rank - 1):
                return sum(layouts, ())
            return self._join(layer, layouts, tensor)
        if isinstance(layer, _MERGES):
            return self._join(layer, layouts, tensor)
        return self._opaque(layer, layouts, tensor, "cannot be followed")

    def _join(self, layer, layouts, tensor):
        """The layout of an element-wise join: its inputs' groups, united
        position by position where their layouts line up."""
        first = layouts[0]
        for other in layouts[1:]:
            same = len(other) == len(first) and all(
                self.group(a).size == self.group(b).size
                for a, b in zip(first, other)
            )
            if not same:
                return self._opaque(
                    layer,
                    layouts,
                    tensor,
                    "joins inputs whose channels are split differently "
                    "(by concatenations), which no pruning keeps aligned",
                )
        for other in layouts[1:]:
            for a, b in zip(first, other):
                self._union(a, b)
        return first

    def _opaque(self, layer, layouts, tensor, why):
        reason = _reason(layer, why)
        for layout in layouts:
            for index in layout:
                self._block(index, reason)
        index = self._new(tensor.shape[-1])
        self._fix(index, reason)
        return (index,)


def _reason(layer, why):
    return f"the layer {layer.name!r} ({type(layer).__name__}) {why}"


def _channel_axis_only(layer, tensor):
    if isinstance(layer, L.BatchNormalization):
        return layer.axis in (-1, len(tensor.shape) - 1)
    return layer.depth_multiplier == 1


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Structured pruning needs a Functional or Sequential "
            f"`keras.Model`. Received: model={model!r}"
        )
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        outputs = None
    if not outputs:
        raise ValueError(
            "Structured pruning follows the layers' graph, which a "
            "subclassed model or an unbuilt Sequential model does not "
            "have. Build it from `keras.Input` (a Sequential model: give "
            f"it `keras.Input(shape)` first). Received: model={model.name!r}"
        )
    for layer in model.layers:
        if is_quantized(layer):
            raise ValueError(
                f"The layer {layer.name!r} is quantised or has LoRA "
                "enabled; prune the float model, then quantise the pruned "
                "one."
            )
