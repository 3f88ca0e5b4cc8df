"""Structured pruning: a smaller plain Keras model with copied weights."""

import keras
import numpy as np

from keras_selfdistill import _arguments
from keras_selfdistill import _internals
from keras_selfdistill.pruning._graph import Graph
from keras_selfdistill.pruning.importance import magnitude

L = keras.layers


def prune(model, ratio=None, scores=None, keep=None):
    """Removes channels and units, returning a smaller Keras model.

    The step before a recovery by distillation (Minitron: prune, then
    distil from the original). Output channels of `Conv` layers and units
    of `Dense` layers are removed with everything that belongs to them:
    their kernel columns and biases, the `BatchNormalization` and depthwise
    weights they pass through, and the input rows of every layer that reads
    them, across `Flatten`, pooling and `Concatenate`. Channels that a
    residual `Add` joins are one group, pruned alike in every producer.
    Model inputs and outputs keep their shapes. A layer that the pruning
    cannot follow (a `Lambda`, a custom layer, `LayerNormalization` or a
    softmax over the channels) blocks the channels it reads, and pruning
    those is refused with its name.

    The result is a fresh, uncompiled, trainable Functional (or
    Sequential) model of Keras layers, with the original's weights where
    they were kept, even where the original is frozen as a teacher; it
    saves and loads without this library. The original is untouched.

    Groups of channels are named after their first producing layer, as
    `keras_selfdistill.pruning.magnitude` and
    `keras_selfdistill.pruning.activation` return their scores.

    Reference:

    - [Muralidharan et al., 2024](https://arxiv.org/abs/2407.14679)
      (Minitron)

    Args:
        model: A Functional or Sequential `keras.Model`.
        ratio: The fraction of each group's channels to remove, in
            `[0, 1)`: a number for every prunable group, or
            `{group name: fraction}` for some. `floor(ratio · size)` of the
            lowest-scoring channels go. Give `ratio` or `keep`.
        scores: `{group name: one score per channel}`, larger kept first.
            Defaults to `keras_selfdistill.pruning.magnitude(model)`.
        keep: `{group name: indices of the channels to keep}`, exactly,
            in place of `ratio` and `scores`.

    Returns:
        The pruned model.

    Example:

    ```python
    ksd = keras_selfdistill
    scores = ksd.pruning.activation(teacher, x_train[:512])
    student = ksd.pruning.prune(teacher, 0.5, scores=scores)
    distiller = ksd.Distiller(student, [ksd.terms.Distillation(teacher)])
    ```
    """
    graph = Graph(model)
    if (ratio is None) == (keep is None):
        raise ValueError(
            "`prune` takes either `ratio` (with optional `scores`) or "
            f"`keep`. Received: ratio={ratio!r}, keep={keep!r}"
        )
    if keep is None:
        if scores is None:
            scores = magnitude(model)
        keep = _choose(graph, ratio, scores)
    else:
        if scores is not None:
            raise ValueError(
                "`keep` names the channels exactly; `scores` would be "
                "ignored. Pass one of them. Received: scores and keep"
            )
        keep = _checked_keep(graph, keep)
    return _rebuild(model, graph, keep)


def _prunable(graph, name, argument):
    group = graph.groups.get(name)
    if group is None:
        raise ValueError(
            f"`{argument}` names {name!r}, which is not a group of channels "
            f"of {graph.model.name!r}; groups are named after their first "
            f"producing layer: {sorted(graph.groups)}. Received: {name!r}"
        )
    reason = group.fixed or group.blocked
    if reason:
        raise ValueError(
            f"The channels of {name!r} cannot be pruned: {reason}. Leave "
            f"them out of `{argument}`."
        )
    return group


def _choose(graph, ratio, scores):
    if isinstance(ratio, dict):
        ratios = dict(ratio)
    else:
        blocked = {
            name: group.blocked
            for name, group in graph.groups.items()
            if group.blocked and not group.fixed
        }
        if blocked:
            lines = "; ".join(f"{n!r}: {r}" for n, r in blocked.items())
            raise ValueError(
                "A single `ratio` would prune every group, but these cannot "
                f"be pruned: {lines}. Pass `ratio` as a dict for the groups "
                "to prune: "
                f"{[n for n, g in graph.groups.items() if g.prunable]}."
            )
        ratios = {
            name: ratio
            for name, group in graph.groups.items()
            if group.prunable
        }
    keep = {}
    for name, fraction in ratios.items():
        group = _prunable(graph, name, "ratio")
        if not _arguments.is_number(fraction) or not 0 <= fraction < 1:
            raise ValueError(
                "A pruning `ratio` is the fraction of a group's channels to "
                "remove, in [0, 1): 1 would remove them all. Received: "
                f"ratio={fraction!r} for {name!r}"
            )
        score = np.asarray(scores.get(name, ()), "float64")
        if score.shape != (group.size,):
            raise ValueError(
                f"`scores` must hold one score per channel of {name!r} "
                f"({group.size}). Received: shape {score.shape}"
            )
        count = group.size - int(np.floor(fraction * group.size))
        # A stable sort keeps the lower index among equal scores.
        order = np.argsort(-score, kind="stable")
        keep[name] = np.sort(order[:count])
    return keep


def _checked_keep(graph, keep):
    if not isinstance(keep, dict):
        raise TypeError(
            "`keep` is `{group name: indices of the channels to keep}`. "
            f"Received: keep={keep!r}"
        )
    checked = {}
    for name, indices in keep.items():
        group = _prunable(graph, name, "keep")
        indices = np.asarray(indices)
        unique = np.unique(indices)
        valid = (
            indices.ndim == 1
            and np.issubdtype(indices.dtype, np.integer)
            and len(unique) == len(indices)
            and (len(indices) == 0 or 0 <= unique[0] <= unique[-1] < group.size)
        )
        if not valid:
            raise ValueError(
                f"`keep[{name!r}]` must be distinct channel indices in "
                f"[0, {group.size}). Received: {indices.tolist()!r}"
            )
        if len(unique) == 0:
            raise ValueError(
                f"`keep[{name!r}]` keeps no channel, which would remove "
                f"the layer's whole output. Received: {indices.tolist()!r}"
            )
        checked[name] = unique
    return checked


def _rebuild(model, graph, keep):
    def clone(layer):
        config = layer.get_config()
        # A fresh model to train: the original may be frozen as a teacher
        # (`Distillation` freezes it in place).
        config["trainable"] = True
        entry = graph.layers.get(layer.name)
        if entry is not None and entry[2] is not None:
            if entry[2].name in keep:
                config[_width_key(layer)] = len(keep[entry[2].name])
        return layer.__class__.from_config(config)

    inputs = None
    if not isinstance(model, keras.Sequential):
        # Keras would name the new inputs after the symbolic tensors,
        # not the input layers, which dict inputs are keyed by.
        inputs = keras.tree.map_structure(
            lambda t: keras.Input(
                batch_shape=t.shape,
                dtype=t.dtype,
                sparse=t.sparse,
                name=_internals.producing_operation(t).name,
            ),
            model.input,
        )
    with _internals.trusted_deserialization():
        pruned = _internals.clone_uncompiled(
            model, input_tensors=inputs, clone_function=clone
        )
    for layer in model.layers:
        if not layer.weights:
            continue
        new = pruned.get_layer(layer.name)
        for old, fresh in zip(layer.weights, new.weights):
            value = _internals.to_numpy(old)
            value = _sliced(graph, keep, layer, old.name, value)
            fresh.assign(value)
    return pruned


def _width_key(layer):
    if isinstance(layer, L.Embedding):
        return "output_dim"
    return "units" if isinstance(layer, L.Dense) else "filters"


def _sliced(graph, keep, layer, variable, value):
    """`value` of `layer`'s variable with the pruned channels removed."""
    entry = graph.layers.get(layer.name)
    if entry is None:
        return value
    _, layout, group = entry
    rows = None if layout is None else graph.rows(layout, keep)
    if group is None:
        # A channel-wise layer: its input channels are on the axis that
        # every one of its variables has for them.
        axis = -2 if variable == "kernel" else 0
        return np.take(value, rows, axis=axis)
    columns = keep.get(group.name)
    if variable == "embeddings":
        return value if columns is None else value[:, columns]
    if variable == "bias":
        return value if columns is None else value[columns]
    if columns is not None:
        value = np.take(value, columns, axis=-1)
    return np.take(value, rows, axis=-2)
