"""Per-sample divergences between teacher and student logits.

Every function takes logits of shape `(..., num_classes)` and returns one
value per row, shape `(...)`, computed in float32 whatever the input dtype:
softmax and logarithms of float16 logits lose the small probabilities that
distillation exists to transfer. Reduction over the batch (and sample
weights) is left to the caller, so that it can match Keras's own. A
teacher's targets may be log-probabilities instead (`teacher_kind`, see
`keras_selfdistill.targets`). The closed-form KL is in `_tempered_kl`.
"""

from keras import ops

from keras_selfdistill import targets as ksd_targets
from keras_selfdistill._tempered_kl import tempered_kl
from keras_selfdistill.targets import LOG_ZERO as _LOG_ZERO


def _log_softmax(logits, temperature):
    logits = ops.cast(logits, "float32")
    temperature = ops.cast(temperature, "float32")
    return ops.log_softmax(logits / temperature, axis=-1)


def _kl(log_p, log_q):
    # A KL is >= 0; float rounding makes near-equal rows slightly negative,
    # which a logged or monitored loss must not show.
    return ops.maximum(ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1), 0.0)


def kl_divergence(
    teacher_logits, student_logits, temperature=1.0, teacher_kind="logits"
):
    """Hinton's distillation loss: `T² · KL(softmax(t/T) ‖ softmax(s/T))`.

    The `T²` factor keeps the gradient magnitude independent of the
    temperature (Hinton et al., 2015, section 2). The value is zero when the
    logits are equal and unchanged when a constant is added to a row. The
    gradient is the exact closed form, `T·(q − p)` for the student's
    logits (also for the teacher's logits and the temperature), not
    autodiff through the branch that keeps the value precise at large `T`.

    Reference:

    - [Hinton et al., 2015](https://arxiv.org/abs/1503.02531)

    Args:
        teacher_logits: Tensor of shape `(..., num_classes)`.
        student_logits: Tensor of the same shape.
        temperature: Positive scalar. Defaults to `1.0`.
        teacher_kind: `"logits"`, divided by `temperature`, or
            `"log_probs"`, the target's log-probabilities at `temperature`,
            used as they are (a teacher's `target_kind`; see
            `keras_selfdistill.targets`). Defaults to `"logits"`.

    Returns:
        Float32 tensor of shape `(...)`.

    Example:

    ```python
    loss = keras_selfdistill.ops.kl_divergence(t, s, temperature=4.0)
    ```
    """
    return tempered_kl(
        teacher_logits, student_logits, temperature, kind=teacher_kind
    )


def reverse_kl_divergence(
    teacher_logits, student_logits, temperature=1.0, teacher_kind="logits"
):
    """Mode-seeking distillation: `T² · KL(softmax(s/T) ‖ softmax(t/T))`.

    Reverse KL lets the student concentrate on the teacher's main modes
    instead of covering all of them, as used by MiniLLM. The gradient is
    the exact closed form (see `kl_divergence`).

    Reference:

    - [Gu et al., 2024](https://arxiv.org/abs/2306.08543)

    Args:
        teacher_logits: Tensor of shape `(..., num_classes)`.
        student_logits: Tensor of the same shape.
        temperature: Positive scalar. Defaults to `1.0`.
        teacher_kind: `"logits"`, divided by `temperature`, or
            `"log_probs"`, the target's log-probabilities at `temperature`,
            used as they are (a teacher's `target_kind`; see
            `keras_selfdistill.targets`). Defaults to `"logits"`.

    Returns:
        Float32 tensor of shape `(...)`.

    Example:

    ```python
    loss = keras_selfdistill.ops.reverse_kl_divergence(t, s)
    ```
    """
    return tempered_kl(
        teacher_logits,
        student_logits,
        temperature,
        reverse=True,
        kind=teacher_kind,
    )


def generalized_jsd(
    teacher_logits,
    student_logits,
    beta=0.5,
    temperature=1.0,
    teacher_kind="logits",
):
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
        teacher_kind: `"logits"`, divided by `temperature`, or
            `"log_probs"`, the target's log-probabilities at `temperature`,
            used as they are (a teacher's `target_kind`; see
            `keras_selfdistill.targets`). Defaults to `"logits"`.

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
        return kl_divergence(
            teacher_logits, student_logits, temperature, teacher_kind
        )
    if beta == 1.0:
        return reverse_kl_divergence(
            teacher_logits, student_logits, temperature, teacher_kind
        )
    log_p = ksd_targets.log_probs(teacher_logits, teacher_kind, temperature)
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


def decoupled_kl(
    teacher_logits,
    student_logits,
    target,
    beta,
    temperature=1.0,
    teacher_kind="logits",
):
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
        teacher_kind: `"logits"`, divided by `temperature`, or
            `"log_probs"`, the target's log-probabilities at `temperature`,
            used as they are (a teacher's `target_kind`; see
            `keras_selfdistill.targets`). Defaults to `"logits"`.

    Returns:
        Float32 tensor of shape `(...)`.

    Example:

    ```python
    loss = keras_selfdistill.ops.decoupled_kl(
        t, s, keras.ops.one_hot(y, 10), beta=8.0, temperature=4.0)
    ```
    """
    log_p = ksd_targets.log_probs(teacher_logits, teacher_kind, temperature)
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


def _sparse_student(ids, student_logits, temperature):
    """The student's tempered log-probabilities of the classes `ids`."""
    log_q = _log_softmax(student_logits, temperature)
    return ops.take_along_axis(log_q, ops.cast(ids, "int32"), axis=-1)


def _log_mass_outside(log_q, ids):
    """`log Σ q` over the classes not in `ids`, as `(..., 1)`.

    A log-sum-exp over the other classes, not `log(1 − Σ_ids q)`, which
    loses every digit in float32 once the classes in `ids` hold nearly all
    the mass.
    """
    classes = log_q.shape[-1]
    k = ids.shape[-1]
    flat_q = ops.reshape(log_q, (-1, classes))
    flat_ids = ops.reshape(ids, (-1, k))
    rows = ops.shape(flat_ids)[0]
    row_index = ops.repeat(ops.arange(rows)[:, None], k, axis=1)
    indices = ops.stack(
        [ops.reshape(row_index, (-1,)), ops.reshape(flat_ids, (-1,))], axis=-1
    )
    kept = ops.scatter(
        indices, ops.ones((rows * k,), "float32"), (rows, classes)
    )
    outside = ops.logsumexp(ops.where(kept > 0, -1e9, flat_q), axis=-1)
    outside = ops.maximum(outside, _LOG_ZERO)
    return ops.reshape(outside, ops.shape(log_q)[:-1] + (1,))


def top_k_divergence(
    ids, log_probs, rest, student_logits, loss="kl", beta=0.5, temperature=1.0
):
    """A divergence from a teacher's top-k targets, on `k + 1` classes.

    The teacher gave its `k` most likely classes `ids` with their
    log-probabilities and `rest`, the log of the mass outside them; the
    student's distribution is folded the same way (its probabilities of
    `ids`, and one class holding the rest of its mass), and `loss` is taken
    between the two `k + 1`-class distributions, times `T²`. With the rest
    kept as a class the targets stay a distribution: the common top-k
    recipe renormalises the `k` probabilities to 1 instead, which
    over-weights them and never asks the student to leave mass outside
    them (the bias RS-KD measures). The teacher's `k + 1` log-probabilities
    are renormalised to sum to 1 (they were stored rounded); with `k` equal
    to the number of classes the value is the dense divergence. The
    divergence of the folded distributions is a lower bound of the full
    one (data processing); `keras_selfdistill.ops.sampled_kl_divergence`
    is unbiased instead.

    Reference:

    - [Anshumann et al., 2025](https://arxiv.org/abs/2503.16870) (RS-KD:
      top-k targets are biased)

    Args:
        ids: Integer tensor `(..., k)`, the teacher's classes.
        log_probs: Tensor `(..., k)`, the teacher's log-probabilities of
            `ids` at `temperature`.
        rest: Tensor `(...)`, the log of the teacher's mass outside `ids`.
        student_logits: Tensor `(..., num_classes)`.
        loss: `"kl"`, `"reverse_kl"` or `"jsd"`. Defaults to `"kl"`.
        beta: The JSD's `β` in `(0, 1)`. Defaults to `0.5`.
        temperature: The temperature the targets were taken at. Defaults
            to `1.0`.

    Returns:
        Float32 tensor of shape `(...)`.

    Example:

    ```python
    loss = keras_selfdistill.ops.top_k_divergence(ids, log_p, rest, s)
    ```
    """
    if loss not in ("kl", "reverse_kl", "jsd"):
        raise ValueError(
            'Top-k targets support loss="kl", "reverse_kl" and "jsd". '
            f"Received: loss={loss!r}"
        )
    log_q_all = _log_softmax(student_logits, temperature)
    ids = ops.cast(ids, "int32")
    log_q = ops.take_along_axis(log_q_all, ids, axis=-1)
    log_q = ops.concatenate([log_q, _log_mass_outside(log_q_all, ids)], -1)
    log_p = ops.concatenate(
        [
            ops.cast(log_probs, "float32"),
            ops.cast(rest, "float32")[..., None],
        ],
        axis=-1,
    )
    log_p = ops.maximum(
        log_p - ops.logsumexp(log_p, axis=-1, keepdims=True), _LOG_ZERO
    )
    if loss == "kl":
        value = _kl(log_p, log_q)
    elif loss == "reverse_kl":
        value = _kl(log_q, log_p)
    else:
        log_m = ops.logaddexp(
            log_p + ops.log(ops.cast(beta, "float32")),
            log_q + ops.log(ops.cast(1.0 - beta, "float32")),
        )
        value = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    return ops.square(ops.cast(temperature, "float32")) * value


def sampled_kl_divergence(
    ids, weights, log_probs, student_logits, temperature=1.0
):
    """RS-KD's unbiased estimate of `T² · KL(teacher ‖ student)`.

    The teacher's distribution is represented by draws from it: the
    distinct classes `ids` with their share `weights` of the draws, whose
    expectation is the teacher's probability, so `Σ w·(log p − log q)` is
    an unbiased estimate of the KL and its gradient, `q − w`, of the KL's
    gradient `q − p` (RS-KD, §3). The weights are renormalised to sum to 1
    (they were stored rounded). One position's estimate can be negative;
    its expectation cannot.

    Reference:

    - [Anshumann et al., 2025](https://arxiv.org/abs/2503.16870)

    Args:
        ids: Integer tensor `(..., k)`, the drawn classes (slots of weight
            0 are padding).
        weights: Tensor `(..., k)`, each class's share of the draws.
        log_probs: Tensor `(..., k)`, the teacher's log-probabilities of
            `ids` at `temperature`.
        student_logits: Tensor `(..., num_classes)`.
        temperature: The temperature the draws were taken at. Defaults to
            `1.0`.

    Returns:
        Float32 tensor of shape `(...)`.

    Example:

    ```python
    loss = keras_selfdistill.ops.sampled_kl_divergence(ids, w, log_p, s)
    ```
    """
    log_q = _sparse_student(ids, student_logits, temperature)
    weights = ops.cast(weights, "float32")
    weights = weights / ops.maximum(
        ops.sum(weights, axis=-1, keepdims=True), 1e-30
    )
    value = ops.sum(weights * (ops.cast(log_probs, "float32") - log_q), axis=-1)
    return ops.square(ops.cast(temperature, "float32")) * value


def one_hot_labels(y, logits):
    """Whether labels `y` are one-hot (or soft) rows rather than indices."""
    return (
        len(y.shape) == len(logits.shape)
        and y.shape[-1] == logits.shape[-1]
        and y.shape[-1] != 1
    )
