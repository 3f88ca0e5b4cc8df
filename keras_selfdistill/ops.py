"""Per-sample divergences between teacher and student logits.

Every function takes logits of shape `(..., num_classes)` and returns one
value per row, shape `(...)`, computed in float32 whatever the input dtype:
softmax and logarithms of float16 logits lose the small probabilities that
distillation exists to transfer. Reduction over the batch (and sample
weights) is left to the caller, so that it can match Keras's own.
"""

from keras import ops

from keras_selfdistill import _internals


def _log_softmax(logits, temperature):
    logits = ops.cast(logits, "float32")
    temperature = ops.cast(temperature, "float32")
    return ops.log_softmax(logits / temperature, axis=-1)


# Below this temperature the plain difference of log-softmaxes keeps float32
# precision (its relative error grows as T²: 7e-7 at T = 4, half the value
# at T = 1e4); above it, the ratio is computed from (t − s)/T.
_PRECISE_FROM = 8.0


def _log_ratio(teacher_logits, student_logits, temperature):
    """`(log p, log q, log p − log q)` with the ratio precise at any T.

    At large temperatures both log-softmaxes are `−log C` plus terms of
    order `1/T`, and their difference loses every digit that `T²·KL`
    needs (T = 1e4 gave 3.68 for a true 7.34). From `T = 8` on, rows whose
    `d = (t − s)/T` spans less than 1 take the ratio from `d` instead:
    `log p − log q = d − log Σ q·exp(d)`, with the logarithm as
    `log1p(Σ q·expm1(d − max d))`; other rows, and lower temperatures, keep
    the plain difference (one branch runs, so small T pays nothing).
    """
    teacher_logits = ops.cast(teacher_logits, "float32")
    student_logits = ops.cast(student_logits, "float32")
    temperature = ops.cast(temperature, "float32")
    log_p = ops.log_softmax(teacher_logits / temperature, axis=-1)
    log_q = ops.log_softmax(student_logits / temperature, axis=-1)

    def precise():
        d = (teacher_logits - student_logits) / temperature
        shifted = d - ops.max(d, axis=-1, keepdims=True)
        narrow = ops.min(shifted, axis=-1, keepdims=True) > -1.0
        # Over a span below 1, Σ q·expm1 stays above e⁻¹ − 1; the floor
        # only keeps the unused rows finite (their gradient would be NaN).
        mean = ops.sum(ops.exp(log_q) * ops.expm1(shifted), -1, keepdims=True)
        ratio = shifted - ops.log1p(ops.maximum(mean, -0.9))
        return ops.where(narrow, ratio, log_p - log_q)

    known = _internals.concrete_scalar(temperature)
    if known is not None:
        ratio = precise() if known >= _PRECISE_FROM else log_p - log_q
    else:
        ratio = ops.cond(
            temperature >= _PRECISE_FROM, precise, lambda: log_p - log_q
        )
    return log_p, log_q, ratio


def _kl(log_p, log_q):
    # A KL is >= 0; float rounding makes near-equal rows slightly negative,
    # which a logged or monitored loss must not show.
    return ops.maximum(ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1), 0.0)


def kl_divergence(teacher_logits, student_logits, temperature=1.0):
    """Hinton's distillation loss: `T² · KL(softmax(t/T) ‖ softmax(s/T))`.

    The `T²` factor keeps the gradient magnitude independent of the
    temperature (Hinton et al., 2015, section 2). The value is zero when the
    logits are equal and unchanged when a constant is added to a row.

    Reference:
    - [Hinton et al., 2015](https://arxiv.org/abs/1503.02531)

    Args:
        teacher_logits: Tensor of shape `(..., num_classes)`.
        student_logits: Tensor of the same shape.
        temperature: Positive scalar. Defaults to `1.0`.

    Returns:
        Float32 tensor of shape `(...)`.

    Example:

    ```python
    loss = keras_selfdistill.ops.kl_divergence(t, s, temperature=4.0)
    ```
    """
    log_p, _, ratio = _log_ratio(teacher_logits, student_logits, temperature)
    kl = ops.maximum(ops.sum(ops.exp(log_p) * ratio, axis=-1), 0.0)
    return ops.square(ops.cast(temperature, "float32")) * kl


def reverse_kl_divergence(teacher_logits, student_logits, temperature=1.0):
    """Mode-seeking distillation: `T² · KL(softmax(s/T) ‖ softmax(t/T))`.

    Reverse KL lets the student concentrate on the teacher's main modes
    instead of covering all of them, as used by MiniLLM.

    Reference:
    - [Gu et al., 2024](https://arxiv.org/abs/2306.08543)

    Args:
        teacher_logits: Tensor of shape `(..., num_classes)`.
        student_logits: Tensor of the same shape.
        temperature: Positive scalar. Defaults to `1.0`.

    Returns:
        Float32 tensor of shape `(...)`.

    Example:

    ```python
    loss = keras_selfdistill.ops.reverse_kl_divergence(t, s)
    ```
    """
    _, log_q, ratio = _log_ratio(teacher_logits, student_logits, temperature)
    kl = ops.maximum(-ops.sum(ops.exp(log_q) * ratio, axis=-1), 0.0)
    return ops.square(ops.cast(temperature, "float32")) * kl


def generalized_jsd(teacher_logits, student_logits, beta=0.5, temperature=1.0):
    """Generalized Jensen-Shannon divergence of GKD, times `T²`.

    With `P` the teacher and `Q` the student distribution and
    `M = β·P + (1−β)·Q`, the divergence is `β·KL(P‖M) + (1−β)·KL(Q‖M)`.
    For `0 < β < 1` it is bounded and symmetric in spirit; as `β → 0` it
    behaves like `β·KL(P‖Q)` and as `β → 1` like `(1−β)·KL(Q‖P)`, so the
    formula itself vanishes at the end points. As in GKD's reference code,
    `β = 0` is therefore defined as forward KL and `β = 1` as reverse KL.

    Reference:
    - [Agarwal et al., 2024](https://arxiv.org/abs/2306.13649)

    Args:
        teacher_logits: Tensor of shape `(..., num_classes)`.
        student_logits: Tensor of the same shape.
        beta: Python float in `[0, 1]`. Defaults to `0.5`.
        temperature: Positive scalar. Defaults to `1.0`.

    Returns:
        Float32 tensor of shape `(...)`.

    Example:

    ```python
    loss = keras_selfdistill.ops.generalized_jsd(t, s, beta=0.1)
    ```
    """
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(
            "`beta` must be in [0, 1]: 0 is forward KL, 1 is reverse KL. "
            f"Received: beta={beta}"
        )
    if beta == 0.0:
        return kl_divergence(teacher_logits, student_logits, temperature)
    if beta == 1.0:
        return reverse_kl_divergence(
            teacher_logits, student_logits, temperature
        )
    log_p = _log_softmax(teacher_logits, temperature)
    log_q = _log_softmax(student_logits, temperature)
    log_m = ops.logaddexp(
        log_p + ops.log(ops.cast(beta, "float32")),
        log_q + ops.log(ops.cast(1.0 - beta, "float32")),
    )
    jsd = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    return ops.square(ops.cast(temperature, "float32")) * jsd


def logits_mse(teacher_logits, student_logits):
    """Mean squared difference of logits over classes (Ba & Caruana, 2014).

    Not shift-invariant: it asks the student to match the teacher's logits
    themselves, not only their softmax.

    Reference:
    - [Ba & Caruana, 2014](https://arxiv.org/abs/1312.6184)

    Args:
        teacher_logits: Tensor of shape `(..., num_classes)`.
        student_logits: Tensor of the same shape.

    Returns:
        Float32 tensor of shape `(...)`.

    Example:

    ```python
    loss = keras_selfdistill.ops.logits_mse(t, s)
    ```
    """
    difference = ops.cast(student_logits, "float32") - ops.cast(
        teacher_logits, "float32"
    )
    return ops.mean(ops.square(difference), axis=-1)


def decoupled_kl(teacher_logits, student_logits, target, beta, temperature=1.0):
    """Decoupled KD: `T² · (TCKD + β · NCKD)` per row.

    TCKD is the KL between the binary distributions `[p_gt, 1 − p_gt]` of
    teacher and student (how sure each is of the target class); NCKD the
    KL between their distributions over the other classes, renormalised.
    Both are computed in log space, so a teacher certain of the target
    class (`1 − p_gt` below float32's resolution) gives finite values, and
    with two classes NCKD is exactly 0 (one other class, probability 1) and
    TCKD equals Hinton's KD. The official code (megvii-research/mdistiller,
    `distillers/DKD.py`) computes the same quantities with `log` of
    summed probabilities and a `−1000` mask on the target logit; its
    `alpha · TCKD + beta · NCKD` is `alpha · (TCKD + (beta / alpha) ·
    NCKD)` here.

    Reference:
    - [Zhao et al., 2022](https://arxiv.org/abs/2203.08679) (DKD)

    Args:
        teacher_logits: Tensor of shape `(..., num_classes)`.
        student_logits: Tensor of the same shape.
        target: Mask of the target class, same shape: 1 at the label, 0
            elsewhere (a one-hot label).
        beta: Weight of NCKD relative to TCKD.
        temperature: Positive scalar. Defaults to `1.0`.

    Returns:
        Float32 tensor of shape `(...)`.

    Example:

    ```python
    loss = keras_selfdistill.ops.decoupled_kl(
        t, s, keras.ops.one_hot(y, 10), beta=8.0, temperature=4.0)
    ```
    """
    log_p = _log_softmax(teacher_logits, temperature)
    log_q = _log_softmax(student_logits, temperature)
    is_target = ops.cast(target, "float32") > 0.5
    parts = []
    for log_probs in (log_p, log_q):
        on_target = ops.sum(ops.where(is_target, log_probs, 0.0), axis=-1)
        rest = ops.logsumexp(
            ops.where(is_target, -float("inf"), log_probs), axis=-1
        )
        parts.append((on_target, rest))
    (p_target, p_rest), (q_target, q_rest) = parts
    tckd = ops.exp(p_target) * (p_target - q_target) + ops.exp(p_rest) * (
        p_rest - q_rest
    )
    # The target class is zeroed before the exponential: `exp` of its
    # renormalised log-probability overflows for a confident teacher, and
    # the masked branch's infinite gradient would turn into NaN.
    log_p_other = ops.where(is_target, 0.0, log_p - ops.expand_dims(p_rest, -1))
    log_q_other = ops.where(is_target, 0.0, log_q - ops.expand_dims(q_rest, -1))
    nckd = ops.sum(
        ops.where(
            is_target, 0.0, ops.exp(log_p_other) * (log_p_other - log_q_other)
        ),
        axis=-1,
    )
    value = ops.maximum(tckd, 0.0) + beta * ops.maximum(nckd, 0.0)
    return ops.square(ops.cast(temperature, "float32")) * value


def standardize_logits(logits):
    """Z-scores each row of logits: `(z − mean(z)) / (std(z) + 1e-7)`.

    Logit standardisation: the teacher's and the student's logits are
    compared after removing each row's shift and scale, so a temperature
    works as a base temperature and the student need not match the
    teacher's logit range. The standard deviation is the unbiased one
    (over `C − 1`), with `1e-7` added, as in the official code
    (sunshangquan/logit-standardization-KD, `distillers/KD.py`,
    `normalize`: `torch.std` is unbiased by default).

    Reference:
    - [Sun et al., 2024](https://arxiv.org/abs/2403.01427)

    Args:
        logits: Tensor of shape `(..., num_classes)`, at least 2 classes.

    Returns:
        Float32 tensor of the same shape.

    Example:

    ```python
    z = keras_selfdistill.ops.standardize_logits(logits)
    ```
    """
    logits = ops.cast(logits, "float32")
    classes = logits.shape[-1]
    mean = ops.mean(logits, axis=-1, keepdims=True)
    centred = logits - mean
    variance = ops.sum(ops.square(centred), axis=-1, keepdims=True) / (
        classes - 1
    )
    # The floor keeps the gradient finite for a constant row (a zero-
    # initialised head): the square root's derivative is infinite at 0.
    return centred / (ops.sqrt(ops.maximum(variance, 1e-30)) + 1e-7)
