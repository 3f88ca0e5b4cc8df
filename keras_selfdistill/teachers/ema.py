import math

import keras
from keras import ops

from keras_selfdistill import _arguments
from keras_selfdistill import _internals
from keras_selfdistill.teachers.teacher import Teacher
from keras_selfdistill.teachers.teacher import clone_student
from keras_selfdistill.teachers.teacher import copy_variables


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class EMA(Teacher):
    """An exponential moving average of the student (mean teacher).

    A copy of the student whose every variable, BatchNorm moving statistics
    included, follows `ema ← momentum · ema + (1 − momentum) · student`
    after each optimizer step (exactly once per step, also with
    `steps_per_execution > 1`). It is called in inference mode. The copy
    starts from the student's weights when `fit` first starts, so weights
    loaded into the student after building the distiller are used.

    With `warmup=True`, the `t`-th update (from 1) uses
    `min(1 − 1/(t + 1), momentum)`: the true average of the weights seen
    so far until the exponential one is the better estimate, as the mean
    teacher's official code does (CuriousAI/mean-teacher,
    `update_ema_variables`). Off by default, for a constant momentum.
    The official code averages the parameters only and runs its teacher
    in training mode (batch statistics); here BatchNorm's moving
    statistics are averaged too and the teacher runs in inference mode.

    Reference:

    - [Tarvainen & Valpola, 2017](https://arxiv.org/abs/1703.01780)
    - [Caron et al., 2021](https://arxiv.org/abs/2104.14294) (DINO)

    Args:
        momentum: Float in `[0, 1)`; larger is slower. Defaults to `0.999`.
        warmup: Whether early updates use the true average (above).
            Defaults to `False`.
        input_key: Key of the student's input when the batch inputs are a
            dict (the `Distiller`'s `input_key`). Defaults to `None`.
        name: Name of the layer. Defaults to `"ema"`.

    Example:

    ```python
    distiller = keras_selfdistill.Distiller(student, [
        keras_selfdistill.terms.Distillation(
            keras_selfdistill.teachers.EMA(momentum=0.99),
            weight=keras_selfdistill.schedules.SigmoidRampUp(
                ramp_up_steps=2000)),
    ])
    ```
    """

    def __init__(self, momentum=0.999, input_key=None, name=None, warmup=False):
        super().__init__(input_key=input_key, name=name)
        if not isinstance(warmup, bool):
            raise TypeError(
                "EMA `warmup` must be True (the true average until the "
                "moving one is better, as the mean teacher's code does) or "
                f"False. Received: warmup={warmup!r}"
            )
        self.warmup = warmup
        if (
            not _arguments.is_number(momentum)
            or not math.isfinite(momentum)
            or not 0.0 <= momentum < 1.0
        ):
            raise ValueError(
                "EMA `momentum` must be a float in [0, 1) (0.99 to 0.9999 is "
                f"usual). Received: momentum={momentum!r}"
            )
        self.momentum = float(momentum)
        self.model = None
        self.updates = self.add_weight(
            shape=(),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            name="updates",
        )

    follows_student = True

    def attach(self, student):
        if not self._follow(student):
            return
        self.model = clone_student(student, "The EMA teacher")

    def _pairs(self):
        return zip(self.model.variables, self._student.variables)

    def on_train_begin(self):
        if int(_internals.to_numpy(self.updates)) == 0:
            copy_variables(self.model.variables, self._student.variables)

    def update(self, data):
        momentum = self.momentum
        if self.warmup:
            # The mean teacher's min(1 − 1/(global_step + 1), decay), its
            # global step counted after the optimizer step, from 1.
            count = ops.cast(self.updates + 1, "float32")
            momentum = ops.minimum(1.0 - 1.0 / (count + 1.0), momentum)
        for average, variable in self._pairs():
            if "float" in str(average.dtype):
                if self.warmup:
                    momentum = ops.cast(momentum, average.dtype)
                average.assign(
                    momentum * average
                    + (1.0 - momentum) * ops.cast(variable, average.dtype)
                )
            else:
                average.assign(ops.copy(variable.value))
        self.updates.assign_add(1)

    def targets(self, x, y_pred, temperature):
        return self._logits(self.model, x)

    def feature_models(self):
        return [self.model]

    def get_config(self):
        config = super().get_config()
        config["momentum"] = self.momentum
        config["warmup"] = self.warmup
        return config
