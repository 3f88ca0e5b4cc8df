"""`TAID`: distillation towards a target that moves from the student to the
teacher (Temporally Adaptive Interpolated Distillation)."""

import math

import keras
from keras import ops

from keras_selfdistill import _arguments
from keras_selfdistill.terms.distillation import Distillation
from keras_selfdistill.terms.distillation import position_weights
from keras_selfdistill.terms.term import Term
from keras_selfdistill.terms.term import replica_mean


class _Current(keras.metrics.Metric):
    """The value last given to `update_state`: after an epoch, the value
    at its last step (Keras's reset at the epoch's start is overwritten by
    the first step)."""

    def __init__(self, name, dtype="float32"):
        super().__init__(name=name, dtype=dtype)
        self.current = self.add_variable(
            shape=(),
            initializer="zeros",
            dtype="float32",
            aggregation="only_first_replica",
            name="current",
        )

    def update_state(self, value):
        self.current.assign(ops.cast(value, "float32"))

    def result(self):
        return ops.convert_to_tensor(self.current)


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class TAID(Distillation):
    """Distillation towards an interpolation of the student and the teacher.

    TAID trains the student towards `p_t = softmax((1 − t)·stop_gradient(s)
    + t·u)` of its own logits `s` and the teacher's `u`, with a coefficient
    `t` that starts at `t_start` and moves to `t_end`: early targets stay
    close to what the student can already represent, which helps when the
    teacher is much larger (capacity gap) and against mode collapse. The
    loss of a position is the cross-entropy `−Σ p_t·log softmax(s)` (the
    official code's `distil_loss`; its gradient is the KL's). After each
    step, `t` follows the official update:

    ```
    r = (L_prev − L) / (L_prev + 1e−15)           # relative change
    m ← momentum·m + (1 − momentum)·r
    t_target = t_start + (t_end − t_start)·step / total_steps
    t ← min(t_end, max(t_target, t + alpha·sigmoid(m)·(1 − t)))
    ```

    where `L` is the step's loss averaged over real tokens (sample weights
    or the padding mask; over all `tf.distribute` replicas) and `step` the
    optimizer steps taken before this one. The first step only records
    `L`. With `adaptive=False`, `t = t_target`, held at `t_end` after
    `total_steps` (the official code extrapolates past it). `t` is logged
    as `<name>_t` in the progress bar and History, and is saved with the
    distiller, so a restart continues it exactly. As in the official code
    the interpolation has no temperature; the teacher's logits (or an
    ensemble's log-probabilities) are used as they are.

    Reference:

    - [Shing et al., 2025](https://arxiv.org/abs/2501.16937) (TAID);
      official code: SakanaAI/TAID, `src/distil_losses/taid.py`, whose
      defaults these are.

    Args:
        teacher: A `keras_selfdistill.teachers.Teacher` or a Keras model
            returning logits.
        total_steps: Integer, the optimizer steps of the whole training
            (the official `estimated_stepping_batches`): `epochs ×
            steps_per_epoch`.
        t_start: Float in `[0, 1)`, the first coefficient. Defaults to
            `0.4`.
        t_end: Float in `(t_start, 1]`, the last. Defaults to `1.0`.
        alpha: Float in `[0, 1]`, the adaptive update's step size.
            Defaults to `5e-4`.
        momentum: Float in `[0, 1)`, the momentum of the relative change
            (the official `beta`). Defaults to `0.99`.
        adaptive: Whether `t` may run ahead of the linear schedule (above).
            Defaults to `True`.
        **kwargs: `Distillation`'s `weight`, `xi`, `reduction`,
            `vocabulary_size` and `name` (defaults to `"taid"`).

    Example:

    ```python
    term = keras_selfdistill.terms.TAID(teacher, total_steps=epochs * steps)
    distiller = keras_selfdistill.Distiller(student, [term])
    distiller.compile(optimizer="adam", loss=loss)
    history = distiller.fit(dataset, epochs=epochs)
    history.history["taid_t"]  # the coefficient after each epoch
    ```
    """

    def __init__(
        self,
        teacher,
        total_steps,
        t_start=0.4,
        t_end=1.0,
        alpha=5e-4,
        momentum=0.99,
        adaptive=True,
        **kwargs,
    ):
        for refused in ("loss", "temperature", "standardize", "beta"):
            if refused in kwargs:
                raise ValueError(
                    f"TAID's loss is the cross-entropy to its interpolated "
                    f"target, without a temperature; `{refused}` does not "
                    f"apply. Received: {refused}={kwargs[refused]!r}"
                )
        kwargs.setdefault("name", "taid")
        super().__init__(teacher, **kwargs)
        if not _arguments.is_integer(total_steps) or total_steps < 1:
            raise ValueError(
                "TAID `total_steps` is the number of optimizer steps of the "
                "whole training (epochs × steps per epoch), an integer >= 1. "
                f"Received: total_steps={total_steps!r}"
            )
        _check_range("t_start", t_start, 0.0, 1.0, closed_high=False)
        _check_range("t_end", t_end, 0.0, 1.0, closed_low=False)
        if not t_start < t_end:
            raise ValueError(
                "TAID `t_start` must be below `t_end`: the target moves from "
                f"the student towards the teacher. Received: "
                f"t_start={t_start!r}, t_end={t_end!r}"
            )
        _check_range("alpha", alpha, 0.0, 1.0)
        _check_range("momentum", momentum, 0.0, 1.0, closed_high=False)
        if not isinstance(adaptive, bool):
            raise TypeError(
                "TAID `adaptive` must be True (the official adaptive "
                "update) or False (the linear schedule alone). "
                f"Received: adaptive={adaptive!r}"
            )
        self.total_steps = int(total_steps)
        self.t_start = float(t_start)
        self.t_end = float(t_end)
        self.alpha = float(alpha)
        self.momentum = float(momentum)
        self.adaptive = adaptive
        # Every replica computes the same values (the loss is averaged
        # over all of them): the first one's assignment is kept.
        state = dict(
            shape=(),
            dtype="float32",
            trainable=False,
            aggregation="only_first_replica",
        )
        self.interpolation = self.add_weight(
            initializer=keras.initializers.Constant(self.t_start),
            name="interpolation",
            **state,
        )
        self.trend = self.add_weight(initializer="zeros", name="trend", **state)
        self.previous_loss = self.add_weight(
            initializer=keras.initializers.Constant(math.inf),
            name="previous_loss",
            **state,
        )
        self.interpolation_metric = _Current(f"{self.name}_t")
        self._token_mean = None
        self._interpolated = False

    def attach(self, student):
        for teacher in self.teacher.walk():
            if getattr(teacher, "kind", "dense") != "dense":
                raise ValueError(_SPARSE)
        super().attach(student)

    def _divergence(self, teacher_logits, student_logits, *args):
        self._interpolated = True
        if self.vocabulary_size is not None:
            teacher_logits = teacher_logits[..., : self.vocabulary_size]
            student_logits = student_logits[..., : self.vocabulary_size]
        t = ops.convert_to_tensor(self.interpolation)
        student_logits = ops.cast(student_logits, "float32")
        target = (1.0 - t) * ops.stop_gradient(student_logits) + t * ops.cast(
            teacher_logits, "float32"
        )
        return -ops.sum(
            ops.softmax(target, axis=-1)
            * ops.log_softmax(student_logits, axis=-1),
            axis=-1,
        )

    def reduce(self, values, sample_weight):
        weights = position_weights(values, sample_weight)
        total = replica_mean(ops.sum(ops.stop_gradient(values) * weights))
        count = replica_mean(ops.sum(weights))
        self._token_mean = total / ops.maximum(count, 1e-12)
        return super().reduce(values, sample_weight)

    def compute_loss_and_mask(self, x, y, y_pred, sample_weight, step, epoch):
        self._token_mean, self._interpolated = None, False
        loss, mask = super().compute_loss_and_mask(
            x, y, y_pred, sample_weight, step, epoch
        )
        if not self._interpolated:
            raise ValueError(_SPARSE)
        self._update(self._token_mean, step)
        self._token_mean = None
        return loss, mask

    def _update(self, loss, step):
        """The official `update_t`, after the step's loss is computed."""
        previous = ops.convert_to_tensor(self.previous_loss)
        t = ops.convert_to_tensor(self.interpolation)
        old_trend = ops.convert_to_tensor(self.trend)
        first = ops.logical_not(ops.isfinite(previous))
        change = (previous - loss) / (previous + 1e-15)
        trend = self.momentum * old_trend + (1.0 - self.momentum) * change
        progress = ops.cast(step, "float32") / float(self.total_steps)
        target = self.t_start + (self.t_end - self.t_start) * progress
        if self.adaptive:
            delta = self.alpha * ops.sigmoid(trend) * (1.0 - t)
            moved = ops.minimum(self.t_end, ops.maximum(target, t + delta))
        else:
            moved = ops.minimum(self.t_end, target)
        t = ops.where(first, t, moved)
        self.interpolation.assign(t)
        # Here, where the step's state is mapped on every backend.
        self.interpolation_metric.update_state(t)
        self.trend.assign(ops.where(first, old_trend, trend))
        self.previous_loss.assign(loss)

    def get_config(self):
        config = super().get_config()
        for name in ("loss", "temperature", "beta", "standardize"):
            config.pop(name, None)
        config.update(
            total_steps=self.total_steps,
            t_start=self.t_start,
            t_end=self.t_end,
            alpha=self.alpha,
            momentum=self.momentum,
            adaptive=self.adaptive,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["teacher"] = keras.saving.deserialize_keras_object(
            config["teacher"]
        )
        return Term.from_config.__func__(cls, config)


_SPARSE = (
    "TAID interpolates the teacher's logits with the student's, so it "
    "needs a teacher that returns them: sparse (top-k or sampled) cached "
    "targets cannot be interpolated. Write a dense cache, or use "
    "Distillation."
)


def _check_range(name, value, low, high, closed_low=True, closed_high=True):
    inside = (
        _arguments.is_number(value)
        and math.isfinite(value)
        and (value >= low if closed_low else value > low)
        and (value <= high if closed_high else value < high)
    )
    if not inside:
        bounds = (
            f"{'[' if closed_low else '('}{low:g}, {high:g}"
            f"{']' if closed_high else ')'}"
        )
        raise ValueError(
            f"TAID `{name}` must be a number in {bounds}. "
            f"Received: {name}={value!r}"
        )
