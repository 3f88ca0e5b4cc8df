"""How much each channel of a model matters, to choose which to prune."""

import keras
import numpy as np

from keras_selfdistill import _internals
from keras_selfdistill._arguments import check_positive_int
from keras_selfdistill.pruning._graph import Graph


def magnitude(model):
    """Each prunable channel's weight magnitude: the simple baseline.

    A channel's score is the L1 norm of the kernel slice that produces it
    (a filter of a `Conv`, a column of a `Dense`, an embedding dimension),
    summed over the producers that a residual `Add` joins into one group
    of channels: "Pruning Filters for Efficient ConvNets"'s criterion. It
    needs no data, and ignores what the next layers do with the channel.

    Reference:

    - [Li et al., 2017](https://arxiv.org/abs/1608.08710)

    Args:
        model: A Functional or Sequential `keras.Model`.

    Returns:
        `{group name: scores}`: for every group of channels that can be
        pruned, named after its first producing layer, a NumPy vector of
        one score per channel (larger matters more).

    Example:

    ```python
    scores = keras_selfdistill.pruning.magnitude(model)
    smaller = keras_selfdistill.pruning.prune(model, 0.5, scores=scores)
    ```
    """
    graph = Graph(model)
    scores = {}
    for name, group in graph.groups.items():
        if not group.prunable:
            continue
        total = np.zeros((group.size,), "float64")
        for layer in group.producers:
            kernel = layer.weights[0]
            value = np.abs(_internals.to_numpy(kernel))
            total += value.reshape(-1, value.shape[-1]).sum(axis=0)
        scores[name] = total
    return scores


def activation(model, x, batch_size=32):
    """Each prunable channel's mean activation on a calibration batch.

    A channel's score is the mean absolute value, over the samples and
    positions of `x`, of the channel where the next layers read it (the
    inputs of the `Dense` and `Conv` layers that consume it, after any
    activation or normalisation between), summed over those readers.
    This is Minitron's activation-based importance, which aggregates each
    neuron's activation over the batch and the sequence; we read it where
    it is consumed rather than at the producer's output so that a channel
    a ReLU silences scores zero, whatever its pre-activation. It costs one
    forward pass and ranks channels by what they carry on real data.

    Reference:

    - [Muralidharan et al., 2024](https://arxiv.org/abs/2407.14679)
      (Minitron, section 2.2)

    Args:
        model: A Functional or Sequential `keras.Model`.
        x: The calibration inputs: an array (or a dict or list of arrays,
            as the model takes them) of at least one sample.
        batch_size: Samples per forward pass. Defaults to `32`.

    Returns:
        `{group name: scores}`, as `keras_selfdistill.pruning.magnitude`
        returns them.

    Example:

    ```python
    scores = keras_selfdistill.pruning.activation(model, x_train[:512])
    smaller = keras_selfdistill.pruning.prune(model, 0.5, scores=scores)
    ```
    """
    check_positive_int("activation", "batch_size", batch_size)
    graph = Graph(model)
    readers = [
        (name, tensor)
        for name, tensor in graph.consumed.items()
        if any(g.prunable for g in graph.groups_of(graph.layers[name][1]))
    ]
    scores = {
        name: np.zeros((group.size,), "float64")
        for name, group in graph.groups.items()
        if group.prunable
    }
    if not readers:
        return scores
    # A Sequential model that was never called has `inputs`, not `input`.
    inputs = (
        model.inputs[0] if isinstance(model, keras.Sequential) else model.input
    )
    probe = keras.Model(inputs, [tensor for _, tensor in readers])
    count = _samples(x)
    sums = [0.0] * len(readers)
    for start in range(0, count, batch_size):
        batch = keras.tree.map_structure(
            lambda a: a[start : start + batch_size], x
        )
        outputs = probe(batch, training=False)
        if len(readers) == 1:
            outputs = [outputs]
        for i, value in enumerate(outputs):
            value = np.abs(_internals.to_numpy(value))
            flat = value.reshape(-1, value.shape[-1]).astype("float64")
            sums[i] = sums[i] + flat.sum(axis=0) * (len(value) / flat.shape[0])
    for (name, _), total in zip(readers, sums):
        _add_segments(graph, graph.layers[name][1], total / count, scores)
    return scores


def _add_segments(graph, layout, values, scores):
    """Adds a reader's per-position means into its groups' scores: the
    mean over the group's positions (a `Flatten` repeats it)."""
    offset, found = 0, {}
    for index in layout:
        group = graph.group(index)
        if group.prunable:
            found.setdefault(group.name, []).append(
                values[offset : offset + group.size]
            )
        offset += group.size
    for name, parts in found.items():
        scores[name] += np.mean(parts, axis=0)


def _samples(x):
    leaves = keras.tree.flatten(x)
    if not leaves or any(not hasattr(a, "shape") for a in leaves):
        raise TypeError(
            "`activation` takes the calibration inputs as arrays (or a dict "
            f"or list of arrays). Received: x of type {type(x).__name__}"
        )
    count = len(leaves[0])
    if count == 0:
        raise ValueError(
            "`activation` needs at least one calibration sample. Received: "
            "x with 0 samples"
        )
    return count
