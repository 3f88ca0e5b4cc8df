"""Schedules for term weights, temperatures and the label weight ξ.

Every hyperparameter also accepts a `keras.optimizers.schedules.
LearningRateSchedule` (e.g. `CosineDecay`) or a plain callable of the
optimizer step, evaluated inside the step like a `Schedule`.

Across `fit` calls, step schedules follow the optimizer's `iterations` and
epoch schedules the distiller's epoch counter, which both go on where the
last call stopped (a larger `initial_epoch` moves the epoch forward).

A schedule maps the training progress (optimizer step and epoch) to a
scalar. Terms evaluate it inside the compiled train step, so a ramp-up
advances every step without retracing. The step is the optimizer's
`iterations` and the epoch the distiller's epoch counter, both variables:
a run resumed with `keras.callbacks.BackupAndRestore` continues the ramp
where it stopped.
"""

import abc
import math

import keras
from keras import ops

from keras_selfdistill import _arguments
from keras_selfdistill import _internals


class Schedule(abc.ABC):
    """Base class: a scalar function of `(step, epoch)`.

    Subclass it and implement `__call__(step, epoch)` returning a scalar
    tensor, `value_range()` returning the smallest and largest value it can
    take (used to validate, say, that a temperature stays positive), and
    `get_config()`.

    Example:

    ```python
    @keras.saving.register_keras_serializable()
    class Halving(keras_selfdistill.schedules.Schedule):
        def __init__(self, every_epochs):
            self.every_epochs = every_epochs

        def __call__(self, step, epoch):
            exponent = keras.ops.floor_divide(epoch, self.every_epochs)
            return keras.ops.power(0.5, keras.ops.cast(exponent, "float32"))

        def value_range(self):
            return 0.0, 1.0

        def get_config(self):
            return {"every_epochs": self.every_epochs}
    ```
    """

    @abc.abstractmethod
    def __call__(self, step, epoch):
        """Returns the scalar value at this optimizer step and epoch."""

    @abc.abstractmethod
    def value_range(self):
        """Returns `(lowest, highest)` value the schedule can take."""

    @abc.abstractmethod
    def get_config(self):
        """Returns the constructor arguments."""

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class _RampUp(Schedule):
    def __init__(
        self, ramp_up_steps=None, ramp_up_epochs=None, start=0.0, end=1.0
    ):
        name = type(self).__name__
        if (ramp_up_steps is None) == (ramp_up_epochs is None):
            raise ValueError(
                f"{name} needs exactly one of `ramp_up_steps` (ramp over "
                "optimizer steps) and `ramp_up_epochs` (ramp over epochs). "
                f"Received: ramp_up_steps={ramp_up_steps}, "
                f"ramp_up_epochs={ramp_up_epochs}"
            )
        for arg, value in (
            ("ramp_up_steps", ramp_up_steps),
            ("ramp_up_epochs", ramp_up_epochs),
        ):
            if value is not None and not _arguments.is_integer(value):
                raise TypeError(
                    f"{name}: `{arg}` must be a positive int. "
                    f"Received: {arg}={value!r}"
                )
            if value is not None and value <= 0:
                raise ValueError(
                    f"{name}: `{arg}` must be a positive int. "
                    f"Received: {arg}={value}"
                )
        for arg, value in (("start", start), ("end", end)):
            if not _arguments.is_number(value) or not math.isfinite(value):
                raise ValueError(
                    f"{name}: `{arg}` must be a finite number. "
                    f"Received: {arg}={value!r}"
                )
        self.ramp_up_steps = (
            None if ramp_up_steps is None else int(ramp_up_steps)
        )
        self.ramp_up_epochs = (
            None if ramp_up_epochs is None else int(ramp_up_epochs)
        )
        self.start = float(start)
        self.end = float(end)

    @abc.abstractmethod
    def _shape(self, progress):
        """Maps progress in [0, 1] to the fraction of the way to `end`."""

    def __call__(self, step, epoch):
        if self.ramp_up_steps is not None:
            counter, length = step, self.ramp_up_steps
        else:
            counter, length = epoch, self.ramp_up_epochs
        progress = ops.clip(ops.cast(counter, "float32") / length, 0.0, 1.0)
        return self.start + (self.end - self.start) * self._shape(progress)

    def value_range(self):
        return min(self.start, self.end), max(self.start, self.end)

    def get_config(self):
        return {
            "ramp_up_steps": self.ramp_up_steps,
            "ramp_up_epochs": self.ramp_up_epochs,
            "start": self.start,
            "end": self.end,
        }


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class LinearRampUp(_RampUp):
    """Goes linearly from `start` to `end`, then stays at `end`.

    Counted in optimizer steps (`ramp_up_steps`) or in epochs
    (`ramp_up_epochs`); with epochs the value is constant within an epoch:
    in the 0-based epoch `t` it is `start + (end − start)·t/ramp_up_epochs`,
    so `end` is first reached in epoch `ramp_up_epochs`. (PS-KD's
    `α_T·(t + 1)/T` reaches `α_T` in the last epoch `T − 1`: use
    `keras_selfdistill.recipes.ps_kd`.)

    Args:
        ramp_up_steps: Number of optimizer steps to reach `end`.
        ramp_up_epochs: Number of epochs to reach `end`. Give exactly one of
            the two.
        start: Value at step or epoch 0. Defaults to `0.0`.
        end: Value after the ramp. Defaults to `1.0`.

    Example:

    ```python
    alpha = keras_selfdistill.schedules.LinearRampUp(
        ramp_up_epochs=300, end=0.8)
    ```
    """

    def _shape(self, progress):
        return progress


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class SigmoidRampUp(_RampUp):
    """The `exp(−5 (1 − p)²)` ramp-up of temporal ensembling and mean teacher.

    Starts flat, so a consistency or self-distillation weight stays near
    `start` while the student's own predictions are still poor.

    Reference:

    - [Laine & Aila, 2017](https://arxiv.org/abs/1610.02242)
    - [Tarvainen & Valpola, 2017](https://arxiv.org/abs/1703.01780)

    Args:
        ramp_up_steps: Number of optimizer steps to reach `end`.
        ramp_up_epochs: Number of epochs to reach `end`. Give exactly one of
            the two.
        start: Value at step or epoch 0 (exactly; the curve itself starts
            at `exp(−5)`). Defaults to `0.0`.
        end: Value after the ramp. Defaults to `1.0`.
        zero_at_start: Whether step or epoch 0 gives `start` exactly.
            `False` follows the curve there too (`exp(−5)` of the way), as
            the mean teacher's `sigmoid_rampup` does. Defaults to `True`.

    Example:

    ```python
    weight = keras_selfdistill.schedules.SigmoidRampUp(ramp_up_steps=2000)
    ```
    """

    def __init__(
        self,
        ramp_up_steps=None,
        ramp_up_epochs=None,
        start=0.0,
        end=1.0,
        zero_at_start=True,
    ):
        super().__init__(ramp_up_steps, ramp_up_epochs, start, end)
        if not isinstance(zero_at_start, bool):
            raise TypeError(
                "SigmoidRampUp: `zero_at_start` must be True or False. "
                f"Received: zero_at_start={zero_at_start!r}"
            )
        self.zero_at_start = zero_at_start

    def _shape(self, progress):
        curve = ops.exp(-5.0 * ops.square(1.0 - progress))
        if not self.zero_at_start:
            return curve
        return ops.where(progress > 0.0, curve, 0.0)

    def get_config(self):
        return dict(super().get_config(), zero_at_start=self.zero_at_start)


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class _StepFunction(Schedule):
    """A function of the optimizer step, e.g. a Keras learning-rate schedule.

    Terms wrap a `keras.optimizers.schedules.LearningRateSchedule` or a
    plain callable `f(step)` in this class. The range of Keras's own
    schedules is read from their arguments (`PolynomialDecay` from its
    start to its end, `PiecewiseConstantDecay` its values, ...); of any other
    function only the value at step 0 is known before training, and `fit`
    checks the values of each epoch's steps at its end.
    """

    def __init__(self, function):
        self.function = function

    def __call__(self, step, epoch):
        return ops.cast(self.function(step), "float32")

    def value_range(self):
        known = _keras_schedule_range(self.function)
        if known is not None:
            return known
        first = float(_internals.to_numpy(self(0, 0)))
        return first, first

    def get_config(self):
        if not isinstance(
            self.function, keras.optimizers.schedules.LearningRateSchedule
        ):
            raise TypeError(
                "A hyperparameter given as a plain function cannot be saved "
                "in a config. Use a `keras.optimizers.schedules."
                "LearningRateSchedule` or a `keras_selfdistill.schedules."
                "Schedule` subclass, or save weights only. Received: "
                f"function={self.function!r}"
            )
        return {"function": keras.saving.serialize_keras_object(self.function)}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["function"]))


def _keras_schedule_range(function):
    """`(lowest, highest)` of a Keras learning-rate schedule, or `None`."""
    known = keras.optimizers.schedules
    if not isinstance(function, known.LearningRateSchedule):
        return None
    config = function.get_config()
    start = float(config.get("initial_learning_rate", 0.0))
    if isinstance(function, known.PolynomialDecay):
        values = [start, float(config["end_learning_rate"])]
    elif isinstance(function, known.PiecewiseConstantDecay):
        values = [float(v) for v in config["values"]]
    elif isinstance(function, known.CosineDecay):
        peak = config.get("warmup_target")
        peak = start if peak is None else float(peak)
        values = [start, peak, float(config["alpha"]) * peak]
    elif isinstance(function, (known.ExponentialDecay, known.InverseTimeDecay)):
        rate = float(config["decay_rate"])
        shrinking = isinstance(function, known.InverseTimeDecay) or rate < 1.0
        # A decay towards 0 keeps its sign and never reaches 0 (the step
        # holds a value that underflows to its bound, and `fit` stops).
        values = (
            [start, math.copysign(1e-30, start)]
            if shrinking
            else [start, math.copysign(math.inf, start)]
        )
    else:
        return None
    return min(values), max(values)


def as_schedule(value):
    """`value`, with a Keras learning-rate schedule or a callable of the
    step wrapped as a `Schedule`; numbers and schedules unchanged."""
    if isinstance(value, Schedule) or not callable(value):
        return value
    return _StepFunction(value)


def deserialize(identifier):
    """A hyperparameter from a term's config.

    A `Schedule`'s config (the dict `keras.saving.serialize_keras_object`
    writes) becomes the schedule; a number, `None` or a `Schedule` is
    returned as it is. A term's `from_config` calls it on each of its
    hyperparameters.

    Example:

    ```python
    config = keras.saving.serialize_keras_object(
        keras_selfdistill.schedules.LinearRampUp(ramp_up_steps=100))
    keras_selfdistill.schedules.deserialize(config)   # a LinearRampUp
    keras_selfdistill.schedules.deserialize(0.5)      # 0.5
    ```
    """
    if identifier is None or isinstance(identifier, Schedule):
        return identifier
    if _arguments.is_number(identifier):
        return identifier
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    raise TypeError(
        "Expected a number, a `keras_selfdistill.schedules.Schedule` or its "
        f"config. Received: identifier={identifier!r}"
    )
