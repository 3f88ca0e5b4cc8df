"""Metrics for distilled models."""

import keras
import numpy as np
from keras import ops

from keras_selfdistill import _internals


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class ExpectedCalibrationError(keras.metrics.Metric):
    """Expected calibration error (ECE) with equal-width confidence bins.

    Samples are binned by confidence (the top class probability) into
    `num_bins` intervals `((i − 1)/B, i/B]`; ECE is the sample-weighted mean
    over bins of `|accuracy − mean confidence|`. Distillation and label
    smoothing change calibration as much as accuracy, so report both.
    Labels may be class indices or one-hot. It reads logits by default, as
    every model this library trains returns; with `from_logits=False`,
    predictions that are not probabilities (negative, or rows not summing
    to 1) are an error (TensorFlow, and eager calls) or make the result
    NaN (compiled JAX code, which cannot raise), never a plausible number.

    Reference:

    - [Guo et al., 2017](https://arxiv.org/abs/1706.04599)

    Args:
        num_bins: Number of confidence bins. Defaults to `15`.
        from_logits: Whether predictions are logits rather than
            probabilities. Defaults to `True`.
        name: Defaults to `"expected_calibration_error"`.
        dtype: Defaults to `None`.

    Example:

    ```python
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy",
                 keras_selfdistill.metrics.ExpectedCalibrationError()],
    )
    ```
    """

    def __init__(
        self,
        num_bins=15,
        from_logits=True,
        name="expected_calibration_error",
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        if (
            isinstance(num_bins, bool)
            or not isinstance(num_bins, int)
            or (num_bins < 1)
        ):
            raise ValueError(
                "`num_bins` must be a positive int. "
                f"Received: num_bins={num_bins!r}"
            )
        if not isinstance(from_logits, bool):
            raise TypeError(
                "`from_logits` must be True (logits) or False "
                f"(probabilities). Received: from_logits={from_logits!r}"
            )
        self.num_bins = num_bins
        self.from_logits = from_logits
        self.counts = self.add_variable((num_bins,), "zeros", name="counts")
        self.confidences = self.add_variable(
            (num_bins,), "zeros", name="confidences"
        )
        self.hits = self.add_variable((num_bins,), "zeros", name="hits")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.cast(y_pred, "float32")
        if self.from_logits:
            probs = ops.softmax(y_pred, axis=-1)
        else:
            probs = _checked_probabilities(y_pred)
        confidence = ops.max(probs, axis=-1)
        predicted = ops.argmax(probs, axis=-1)
        y_true = ops.convert_to_tensor(y_true)
        if len(y_true.shape) == len(probs.shape) and y_true.shape[-1] != 1:
            labels = ops.argmax(y_true, axis=-1)
        else:
            labels = ops.reshape(y_true, ops.shape(predicted))
        hit = ops.cast(
            ops.equal(ops.cast(labels, "int32"), ops.cast(predicted, "int32")),
            "float32",
        )
        bins = ops.clip(
            ops.cast(ops.ceil(confidence * self.num_bins), "int32") - 1,
            0,
            self.num_bins - 1,
        )
        weights = ops.ones_like(confidence)
        if sample_weight is not None:
            weights = ops.reshape(
                ops.cast(sample_weight, "float32"), ops.shape(confidence)
            )
        one_hot = ops.one_hot(bins, self.num_bins) * weights[:, None]
        self.counts.assign_add(ops.sum(one_hot, axis=0))
        self.confidences.assign_add(
            ops.sum(one_hot * confidence[:, None], axis=0)
        )
        hits = ops.sum(one_hot * hit[:, None], axis=0)
        # NaN when traced JAX code saw rows that are not probabilities.
        self.hits.assign_add(hits + 0.0 * ops.sum(probs[:1, :1]))

    def bins(self):
        """The numbers behind the metric and its reliability diagram.

        Returns:
            A dict of NumPy arrays, one entry per bin: `lower` and `upper`
            confidence edges, `counts` (sample weight in the bin),
            `accuracy` and `confidence` (their means in the bin, NaN for an
            empty bin).
        """
        counts = _internals.to_numpy(self.counts).astype("float64")
        edges = np.linspace(0.0, 1.0, self.num_bins + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = _internals.to_numpy(self.hits) / counts
            confidence = _internals.to_numpy(self.confidences) / counts
        empty = counts == 0
        accuracy[empty] = np.nan
        confidence[empty] = np.nan
        return {
            "lower": edges[:-1],
            "upper": edges[1:],
            "counts": counts,
            "accuracy": accuracy,
            "confidence": confidence,
        }

    def result(self):
        gaps = ops.sum(ops.abs(self.hits - self.confidences))
        return ops.divide_no_nan(gaps, ops.sum(self.counts))

    def reset_state(self):
        for variable in (self.counts, self.confidences, self.hits):
            variable.assign(ops.zeros(variable.shape, variable.dtype))

    def get_config(self):
        return {
            "num_bins": self.num_bins,
            "from_logits": self.from_logits,
            "name": self.name,
            "dtype": self.dtype,
        }


_NOT_PROBABILITIES = (
    "ExpectedCalibrationError(from_logits=False) needs probabilities: rows "
    "that are non-negative and sum to 1. These predictions are not (logits?"
    "). Use `from_logits=True`, the default."
)


def _checked_probabilities(y_pred):
    valid = ops.logical_and(
        ops.all(y_pred >= -1e-6),
        ops.all(ops.abs(ops.sum(y_pred, axis=-1) - 1.0) < 1e-3),
    )
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        check = tf.debugging.Assert(valid, [_NOT_PROBABILITIES])
        with tf.control_dependencies([check]):
            return tf.identity(y_pred)
    if not _internals.is_jax_tracer(valid):
        if not bool(valid):
            raise ValueError(f"{_NOT_PROBABILITIES} Received: {y_pred[:2]}")
        return y_pred
    return ops.where(valid, y_pred, float("nan"))
