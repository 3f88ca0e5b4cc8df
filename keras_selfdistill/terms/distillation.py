import keras
from keras import ops

from keras_selfdistill import _arguments
from keras_selfdistill import ops as ksd_ops
from keras_selfdistill.exits import one_hot_labels
from keras_selfdistill.teachers.frozen_model import as_teacher
from keras_selfdistill.teachers.teacher import num_classes
from keras_selfdistill.terms.term import Term
from keras_selfdistill.terms.term import hyperparameter_property

_LOSSES = ("kl", "reverse_kl", "jsd", "mse", "dkd")
_DEFAULT_BETA = {"jsd": 0.5, "dkd": 8.0}
_SINGLE_LOGIT = (
    "The student returns a single logit (binary classification with a "
    "sigmoid): a softmax over one output is always 1, so the distillation "
    "loss would always be 0. Give the student and the teacher two logits: "
    "`[0, z]` has the softmax `[1 - sigmoid(z), sigmoid(z)]`, so nothing "
    "else changes. Or use loss='mse'. Received: outputs with 1 class"
)


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class Distillation(Term):
    """Matches the student's outputs to a teacher's soft targets.

    Use it for classic knowledge distillation from a frozen pre-trained
    model, several teachers (`keras_selfdistill.teachers.Ensemble`), a
    teacher that reads privileged inputs, and, with a self-teacher, for
    self-distillation. The loss choices:

    - `"kl"`: `T² · KL(softmax(t/T) ‖ softmax(s/T))` (Hinton), summed over
      classes and averaged over the batch.
    - `"reverse_kl"`: `T² · KL(softmax(s/T) ‖ softmax(t/T))` (MiniLLM).
    - `"jsd"`: generalized Jensen-Shannon divergence with `beta` (GKD),
      times `T²`; `beta=0` is forward and `beta=1` reverse KL.
    - `"mse"`: mean squared error between logits (temperature-free).
    - `"dkd"`: decoupled KD, `T² · (TCKD + beta · NCKD)`: the target
      class's part and the other classes' part of the KL weighted apart
      (see `keras_selfdistill.ops.decoupled_kl`); needs labels (with
      soft or smoothed one-hot labels, the target class is their argmax).
      The
      paper's `α · TCKD + β · NCKD` is `weight=α, beta=β/α`, and its
      warm-up `min(epoch / 20, 1)` (epochs counted from 1) a `weight`
      schedule; `keras_selfdistill.recipes.dkd` builds the published
      setting.

    `standardize=True` z-scores the teacher's and the student's logits per
    row before the temperature (logit standardisation, see
    `keras_selfdistill.ops.standardize_logits`): the student matches the
    teacher's ranking and relative gaps rather than its logit range, and
    `temperature` acts as the base temperature (the paper uses 2 with a
    KD weight of 9 and a cross-entropy weight of 0.1 on CIFAR-100).

    The objective of a distiller with this term is `supervised + weight ·
    distillation`; with `xi` set it is `(1 − ξ) · supervised + ξ · weight ·
    distillation`, the ground-truth weighting of the self-distillation
    papers (Borup & Andersen; Das & Sanghavi, where `ξ > 1` helps under
    label noise). A sample the teacher has no target for yet (a
    `PastPredictions` bank before its first visit, a `Snapshot` before the
    first snapshot) adds nothing to this term and keeps its label loss at
    full weight. Maths is in float32, also under `mixed_float16`.

    Reference:
    - [Hinton et al., 2015](https://arxiv.org/abs/1503.02531)
    - [Agarwal et al., 2024](https://arxiv.org/abs/2306.13649) (GKD)
    - [Das & Sanghavi, 2023](https://arxiv.org/abs/2301.13304)
    - [Zhao et al., 2022](https://arxiv.org/abs/2203.08679) (DKD)
    - [Sun et al., 2024](https://arxiv.org/abs/2403.01427) (logit
      standardisation)

    Args:
        teacher: A `keras.Model` (used frozen) or a
            `keras_selfdistill.teachers.Teacher`.
        loss: One of `"kl"`, `"reverse_kl"`, `"jsd"`, `"mse"`, `"dkd"`.
            Defaults to `"kl"`.
        temperature: Positive number or schedule softening both
            distributions. Must stay `1.0` for `"mse"`. Defaults to `1.0`.
        weight: Non-negative number or schedule. Defaults to `1.0`.
        xi: Optional label weight ξ (number or schedule); see above.
            Defaults to `None`.
        beta: For `"jsd"`, the interpolation in `[0, 1]` (default `0.5`);
            for `"dkd"`, the weight of NCKD relative to TCKD, at least 0
            (default `8.0`, the paper's CIFAR-100 setting). Not allowed
            with other losses. Defaults to `None`.
        standardize: Whether both logits are z-scored per row first.
            Defaults to `False`.
        name: Name of the term; its metric is `<name>_loss`. Defaults to
            `"distillation"`.

    Example:

    ```python
    distiller = keras_selfdistill.Distiller(
        student,
        terms=[keras_selfdistill.terms.Distillation(
            teacher=big_model, temperature=4.0, weight=0.9)],
    )
    distiller.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    distiller.fit(train_ds, validation_data=val_ds, epochs=10)
    distiller.student.save("student.keras")
    ```
    """

    def __init__(
        self,
        teacher,
        loss="kl",
        temperature=1.0,
        weight=1.0,
        xi=None,
        beta=None,
        standardize=False,
        name=None,
        **kwargs,
    ):
        super().__init__(weight=weight, xi=xi, name=name, **kwargs)
        if loss not in _LOSSES:
            raise ValueError(
                f"Unknown distillation loss. Expected one of {_LOSSES}. "
                f"Received: loss={loss!r}"
            )
        if loss in _DEFAULT_BETA:
            beta = _DEFAULT_BETA[loss] if beta is None else beta
            high = 1.0 if loss == "jsd" else float("inf")
            if not _arguments.is_number(beta) or not 0.0 <= beta <= high:
                raise ValueError(
                    "`beta` of the 'jsd' loss must be a number in [0, 1] "
                    "(0 is forward KL, 1 reverse KL). "
                    f"Received: beta={beta!r}"
                    if loss == "jsd"
                    else "`beta` of the 'dkd' loss weighs NCKD against TCKD "
                    f"and must be a number >= 0. Received: beta={beta!r}"
                )
            beta = float(beta)
        elif beta is not None:
            raise ValueError(
                "`beta` only applies to loss='jsd' and loss='dkd'; it would "
                f"be ignored with loss={loss!r}. Received: beta={beta!r}"
            )
        if not isinstance(standardize, bool):
            raise TypeError(
                "`standardize` must be True (z-score both logits per row) "
                f"or False. Received: standardize={standardize!r}"
            )
        if loss == "mse" and temperature != 1.0:
            raise ValueError(
                "loss='mse' compares raw logits, so a temperature has no "
                "effect on it (dividing by T and multiplying by T² cancel). "
                "Use loss='kl' for tempered targets, or leave "
                f"temperature=1.0. Received: temperature={temperature!r}"
            )
        self.teacher = as_teacher(teacher, "Distillation")
        self.loss = loss
        self.beta = beta
        self.standardize = standardize
        self._add_hyperparameter(
            "temperature", temperature, minimum=0.0, strict=True
        )

    temperature = hyperparameter_property("temperature")

    @property
    def teachers(self):
        return [self.teacher]

    def attach(self, student):
        if self.loss != "mse" and num_classes(student) == 1:
            raise ValueError(_SINGLE_LOGIT)
        self.teacher.attach(student)

    def compute_loss(self, x, y, y_pred, sample_weight, step, epoch):
        return self.compute_loss_and_mask(
            x, y, y_pred, sample_weight, step, epoch
        )[0]

    def compute_loss_and_mask(self, x, y, y_pred, sample_weight, step, epoch):
        temperature = self.hyperparameter("temperature", step, epoch)
        teacher_logits, mask = self.teacher.targets_and_mask(
            x, y_pred, temperature
        )
        for role, logits in (("student", y_pred), ("teacher", teacher_logits)):
            if not hasattr(logits, "shape"):
                raise ValueError(
                    f"Distillation term '{self.name}' needs the {role} to "
                    "return one logits tensor. Received: outputs of type "
                    f"{type(logits).__name__}"
                )
        teacher_shape, student_shape = (
            tuple(teacher_logits.shape)[1:],
            tuple(y_pred.shape)[1:],
        )
        if len(teacher_shape) != len(student_shape) or any(
            None not in (a, b) and a != b
            for a, b in zip(teacher_shape, student_shape)
        ):
            raise ValueError(
                f"Distillation term '{self.name}': teacher and student "
                "outputs must have the same shape (same number of classes). "
                f"Received: teacher shape {tuple(teacher_logits.shape)}, "
                f"student shape {tuple(y_pred.shape)}"
            )
        if student_shape[-1:] == (1,) and self.loss != "mse":
            raise ValueError(_SINGLE_LOGIT)
        if self.standardize:
            teacher_logits = ksd_ops.standardize_logits(teacher_logits)
            y_pred = ksd_ops.standardize_logits(y_pred)
        if self.loss == "dkd":
            target, labelled = self._target(y, y_pred)
            values = ksd_ops.decoupled_kl(
                teacher_logits, y_pred, target, self.beta, temperature
            )
            # Samples without a label (a semi-supervised batch's ignored
            # class) have no target class to decouple.
            values = values * labelled
        elif self.loss == "kl":
            values = ksd_ops.kl_divergence(teacher_logits, y_pred, temperature)
        elif self.loss == "reverse_kl":
            values = ksd_ops.reverse_kl_divergence(
                teacher_logits, y_pred, temperature
            )
        elif self.loss == "jsd":
            values = ksd_ops.generalized_jsd(
                teacher_logits, y_pred, self.beta, temperature
            )
        else:
            values = ksd_ops.logits_mse(teacher_logits, y_pred)
        if mask is None:
            return self._reduce(values, sample_weight), None
        values = values * ops.reshape(
            mask, ops.shape(mask) + (1,) * (len(values.shape) - 1)
        )
        return self._reduce(values, sample_weight), mask

    def _target(self, y, logits):
        """The labels as a one-hot mask, and which rows have a label."""
        if y is None or not hasattr(y, "shape"):
            raise ValueError(
                f"Distillation term '{self.name}' with loss='dkd' separates "
                "the target class from the others, so it needs labels: pass "
                "them to `fit`, or use loss='kl' for label-free "
                f"distillation. Received: labels {y!r}"
            )
        classes = logits.shape[-1]
        if one_hot_labels(y, logits):
            labels = ops.argmax(y, axis=-1)
        else:
            labels = y
            if len(labels.shape) == len(logits.shape):
                labels = ops.squeeze(labels, axis=-1)
        labels = ops.cast(labels, "int32")
        labelled = ops.logical_and(labels >= 0, labels < classes)
        return ops.one_hot(labels, classes), ops.cast(labelled, "float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            teacher=keras.saving.serialize_keras_object(self.teacher),
            loss=self.loss,
            temperature=self._serialize_hyperparameter("temperature"),
            beta=self.beta,
            standardize=self.standardize,
        )
        return config
