"""The metrics the `Distiller` logs: each term's loss, each exit's accuracy,
the supervised loss and the scheduled hyperparameters.

Internal: the `Distiller` creates them; users read them in the progress
bar, History and `EarlyStopping(monitor=...)`.
"""

import keras
from keras import ops

from keras_selfdistill import _internals
from keras_selfdistill.ops import one_hot_labels


class LossMean(keras.metrics.Mean):
    """The epoch's mean of a per-batch scalar, weighted by batch size."""

    def __init__(self, name, direction="down"):
        super().__init__(name=name)
        if direction is not None:
            _internals.set_direction(self, direction)

    def add_batch(self, value, batch_size):
        # `update_state(value, sample_weight=batch_size)` broadcasts, casts
        # and sums a scalar; two in-place adds keep the same mean in fewer
        # ops, which is most of a small model's per-step term cost.
        batch_size = ops.cast(batch_size, self.dtype)
        self.total.assign_add(ops.cast(value, self.dtype) * batch_size)
        self.count.assign_add(batch_size)


class ExitAccuracy(keras.metrics.Mean):
    """Top-1 accuracy of one exit, for sparse or one-hot labels."""

    def __init__(self, name):
        super().__init__(name=name)
        _internals.set_direction(self, "up")

    def update_exit(self, y, logits, sample_weight):
        if one_hot_labels(y, logits):
            labels = ops.argmax(y, axis=-1)
        else:
            labels = ops.reshape(y, (-1,))
        hits = ops.equal(
            ops.cast(labels, "int32"),
            ops.cast(ops.argmax(logits, axis=-1), "int32"),
        )
        self.update_state(ops.cast(hits, self.dtype), sample_weight)


# Grouped in Keras's MetricsList, the term metrics need no `mode=` in
# `EarlyStopping(monitor="distillation_loss")`.
class TermMetrics(_internals.MetricsList):
    def result(self):
        return self.get_result()


def unscale_for_distribution(value):
    # Keras divides each replica's loss by the replica count; the metric
    # reports the per-example value, as Keras's own loss tracker does.
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            value = value * float(replicas)
    return value
