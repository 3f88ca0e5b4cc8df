"""The temperature contract: what a teacher's targets are, and mixtures.

A teacher declares the kind of what its `targets` return
(`keras_selfdistill.teachers.Teacher.target_kind`):

- `"logits"`: scores `z` whose softmax at the term's temperature is the
  target, `softmax(z / T)`. A model's logits, an EMA's, a cache of one
  model (its log-probabilities at the written temperature `T_w`, times
  `T_w`: the logits less a constant per row). The temperature divides
  them once, in the loss.
- `"log_probs"`: the log-probabilities of the target distribution at the
  temperature the teacher was given, used as they are. A mixture of
  several distributions (an ensemble, snapshots, a model's exits), a bank
  of past predictions, a cache of a mixture. Nothing multiplies them by
  `T` to divide them again.

At temperature 1 the two kinds coincide: log-probabilities are logits.

Every mixture in the library goes through `mixture`, one numerics policy:
weighted in log space (log-sum-exp, no additive epsilon), with a class's
log-probability floored at `LOG_ZERO`, where float32's probability is 0 and
the losses' `0 · log 0` terms stay finite.
"""

from keras import ops

LOGITS = "logits"
LOG_PROBS = "log_probs"
KINDS = (LOGITS, LOG_PROBS)

# A class's log-probability below this counts as 0 probability: float32's
# exp() of it is 0, and the losses' 0 · log 0 terms stay finite.
LOG_ZERO = -1e4


def check_kind(kind, owner):
    """Raises a `ValueError` unless `kind` is one of `KINDS`."""
    if kind not in KINDS:
        raise ValueError(
            f"{owner}: the targets' kind must be one of {KINDS}: "
            '"logits" are divided by the temperature in the loss, '
            '"log_probs" are the target\'s log-probabilities at it. '
            f"Received: kind={kind!r}"
        )


def log_probs(targets, kind=LOGITS, temperature=1.0):
    """The target distribution's log-probabilities at `temperature`.

    `log_softmax(targets / T)` for `"logits"`; for `"log_probs"`, the
    targets renormalised over their last axis (`log_softmax(targets)`:
    exact for a distribution, and right for the classes a loss keeps when
    it slices a vocabulary), not divided by `T`. Computed in float32.

    Args:
        targets: Tensor of shape `(..., num_classes)`.
        kind: `"logits"` or `"log_probs"`, the teacher's `target_kind`.
            Defaults to `"logits"`.
        temperature: Positive scalar. Defaults to `1.0`.

    Returns:
        Float32 tensor of the same shape.

    Example:

    ```python
    log_p = keras_selfdistill.targets.log_probs(
        teacher.targets(x, y_pred, 4.0), teacher.target_kind, 4.0)
    ```
    """
    check_kind(kind, "keras_selfdistill.targets.log_probs")
    targets = ops.cast(targets, "float32")
    if kind == LOG_PROBS:
        return ops.log_softmax(targets, axis=-1)
    return ops.log_softmax(targets / ops.cast(temperature, "float32"), axis=-1)


def mixture(members, weights=None, smoothing=0.0):
    """The log-probabilities of a weighted mixture of distributions.

    `log Σ_i w_i · p_i` by log-sum-exp over the members' log-probabilities
    (members first), the weights renormalised to sum to 1 along the
    members' axis. A zero weight, or a member's class at `-inf`, counts
    as probability 0; the result is floored at `LOG_ZERO`. With
    `smoothing = ε > 0`, every class gets `ε` more probability and the
    mixture is renormalised, `(m + ε) / (1 + C·ε)`: a vote of one-hot
    members then keeps a finite log-probability for the classes no member
    voted for, which a reverse KL needs.

    Args:
        members: Tensor `(members, ..., num_classes)` of log-probabilities.
        weights: Optional non-negative tensor of shape `(members,)`, or
            one that broadcasts against `members` (per-sample shares).
            Defaults to `None` (equal weights).
        smoothing: Non-negative Python float. Defaults to `0.0`.

    Returns:
        Float32 tensor `(..., num_classes)`.

    Example:

    ```python
    log_m = keras_selfdistill.targets.mixture(
        keras.ops.stack([log_p_a, log_p_b]), weights=[0.7, 0.3])
    ```
    """
    members = ops.maximum(ops.cast(members, "float32"), LOG_ZERO)
    count = members.shape[0]
    if weights is None:
        weights = ops.ones((count,), "float32")
    weights = ops.cast(weights, "float32")
    if len(weights.shape) == 1:
        weights = ops.reshape(weights, (-1,) + (1,) * (len(members.shape) - 1))
    weights = weights / ops.sum(weights, axis=0, keepdims=True)
    log_weights = ops.where(
        weights > 0.0, ops.log(ops.maximum(weights, 1e-30)), LOG_ZERO
    )
    log_m = ops.logsumexp(members + log_weights, axis=0)
    if smoothing:
        classes = members.shape[-1]
        scale = 1.0 + classes * float(smoothing)
        log_m = ops.logaddexp(
            log_m - ops.log(scale), ops.log(float(smoothing) / scale)
        )
    return ops.maximum(log_m, LOG_ZERO)
