"""`Distillation`: soft targets of any teacher, under every loss kind.

One term for KL, reverse KL, JSD, DKD, MSE, standardised logits and
sparse cached targets (`_cached_targets`), as `DESIGN.md` names it.
"""

import keras
from keras import ops

from keras_selfdistill import _arguments
from keras_selfdistill import _rows
from keras_selfdistill import ops as ksd_ops
from keras_selfdistill import schedules
from keras_selfdistill import targets as ksd_targets
from keras_selfdistill.ops import one_hot_labels
from keras_selfdistill.teachers.frozen_model import as_teacher
from keras_selfdistill.teachers.teacher import num_classes
from keras_selfdistill.terms import _cached_targets
from keras_selfdistill.terms.term import Term
from keras_selfdistill.terms.term import replica_mean
from keras_selfdistill.terms.term import scale_for_distribution

_LOSSES = ("kl", "reverse_kl", "jsd", "mse", "dkd")
_REDUCTIONS = ("sum_over_batch_size", "mean_with_sample_weight")
_DEFAULT_BETA = {"jsd": 0.5, "dkd": 8.0}
_SINGLE_LOGIT = (
    "The student returns a single logit (binary classification with a "
    "sigmoid): a softmax over one output is always 1, so the distillation "
    "loss would always be 0. Give the student and the teacher two logits: "
    "`[0, z]` has the softmax `[1 - sigmoid(z), sigmoid(z)]`, so nothing "
    "else changes. Or use loss='mse'. Received: outputs with 1 class"
)


def position_weights(values, sample_weight):
    """`sample_weight` (a sample's or a position's) broadcast to `values`'
    shape as float32; ones without weights."""
    weights = ops.ones_like(values)
    if sample_weight is None:
        return weights
    sample_weight = ops.cast(sample_weight, "float32")
    while len(sample_weight.shape) > len(values.shape):
        sample_weight = ops.squeeze(sample_weight, -1)
    while len(sample_weight.shape) < len(values.shape):
        sample_weight = ops.expand_dims(sample_weight, -1)
    return weights * sample_weight


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
        reduction="sum_over_batch_size",
        vocabulary_size=None,
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
        if reduction not in _REDUCTIONS:
            raise ValueError(
                "Unknown reduction. Expected 'sum_over_batch_size' (the "
                "weighted sum over the number of positions, as the compiled "
                "Keras loss reduces) or 'mean_with_sample_weight' (the mean "
                f"over real tokens). Received: reduction={reduction!r}"
            )
        if vocabulary_size is not None and (
            not _arguments.is_integer(vocabulary_size) or vocabulary_size < 2
        ):
            raise ValueError(
                "`vocabulary_size` is the number of leading classes both "
                "models share (the rest are padding rows); it must be an "
                f"integer >= 2. Received: vocabulary_size={vocabulary_size!r}"
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
        self.reduction = reduction
        self.vocabulary_size = (
            None if vocabulary_size is None else int(vocabulary_size)
        )
        # Elements evaluated at once over large vocabularies; tests lower
        # it to run many chunks on tiny models.
        self._chunk_elements = _rows.CHUNK_ELEMENTS
        self.add_hyperparameter(
            "temperature", temperature, minimum=0.0, strict=True
        )

    @property
    def temperature(self):
        """The temperature, a number or a schedule.

        Assigning a number (a callback may) is refused when the teacher's
        targets were cached at one temperature and this is another.
        """
        return self._get_hyperparameter("temperature")

    @temperature.setter
    def temperature(self, value):
        _cached_targets.check_temperature(self, value)
        self._set_hyperparameter("temperature", value)

    @property
    def teachers(self):
        return [self.teacher]

    def attach(self, student):
        if self.loss != "mse" and num_classes(student) == 1:
            raise ValueError(_SINGLE_LOGIT)
        if self.vocabulary_size is not None:
            for teacher in self.teacher.walk():
                teacher._compared_width = self.vocabulary_size
        _cached_targets.check(self, student)
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
        if isinstance(teacher_logits, dict):
            sample_weight = self._positions_weight(x, y_pred, sample_weight)
            values = _cached_targets.sparse_values(
                self, teacher_logits, y_pred, temperature
            )
            return self.reduce(values, sample_weight), None
        for role, logits in (("student", y_pred), ("teacher", teacher_logits)):
            if not hasattr(logits, "shape"):
                raise ValueError(
                    f"Distillation term '{self.name}' needs the {role} to "
                    "return one logits tensor. Received: outputs of type "
                    f"{type(logits).__name__}"
                )
        self._check_widths(teacher_logits, y_pred)
        sample_weight = self._positions_weight(x, y_pred, sample_weight)
        rows, scalars = (), (ops.cast(temperature, "float32"),)
        if self.loss == "dkd":
            labels, labelled = self._target(y, y_pred)
            rows = (labels,)
        values = _rows.per_row(
            self._divergence,
            teacher_logits,
            y_pred,
            rows=rows,
            scalars=scalars,
            chunk_elements=self._chunk_elements,
        )
        if self.loss == "dkd":
            # Samples without a label (a semi-supervised batch's ignored
            # class, a padded position's -100) have no target class.
            values = values * labelled
        if mask is None:
            return self.reduce(values, sample_weight), None
        values = values * ops.reshape(
            mask, ops.shape(mask) + (1,) * (len(values.shape) - 1)
        )
        return self.reduce(values, sample_weight), mask

    def _divergence(self, teacher_logits, student_logits, *args):
        """The per-row loss on `(rows, classes)` targets (one chunk)."""
        *labels, temperature = args
        # Log-probabilities are used as they are (`keras_selfdistill.
        # targets`), except where logits are standardised.
        kind = self._target_kind
        if self.vocabulary_size is not None:
            teacher_logits = teacher_logits[..., : self.vocabulary_size]
            student_logits = student_logits[..., : self.vocabulary_size]
        if self.standardize:
            if kind == ksd_targets.LOG_PROBS:
                # A distribution's logits at T are T · log p; the official
                # z-score's 1e-7 makes their scale matter (by 1e-6).
                teacher_logits = temperature * teacher_logits
            teacher_logits = ksd_ops.standardize_logits(teacher_logits)
            student_logits = ksd_ops.standardize_logits(student_logits)
            kind = ksd_targets.LOGITS
        if self.loss == "dkd":
            target = ops.one_hot(labels[0], student_logits.shape[-1])
            return ksd_ops.decoupled_kl(
                teacher_logits,
                student_logits,
                target,
                self.beta,
                temperature,
                teacher_kind=kind,
            )
        if self.loss == "kl":
            return ksd_ops.kl_divergence(
                teacher_logits, student_logits, temperature, teacher_kind=kind
            )
        if self.loss == "reverse_kl":
            return ksd_ops.reverse_kl_divergence(
                teacher_logits, student_logits, temperature, teacher_kind=kind
            )
        if self.loss == "jsd":
            return ksd_ops.generalized_jsd(
                teacher_logits,
                student_logits,
                self.beta,
                temperature,
                teacher_kind=kind,
            )
        # Temperature-free (T = 1, where the two kinds coincide).
        return ksd_ops.logits_mse(teacher_logits, student_logits)

    @property
    def _target_kind(self):
        """What the teacher's rows in `_divergence` are (`targets`)."""
        return self.teacher.target_kind

    def _check_widths(self, teacher_logits, student_logits):
        teacher_shape = tuple(teacher_logits.shape)
        student_shape = tuple(student_logits.shape)
        sequence = len(student_shape) > 2
        what = "vocabulary" if sequence else "number of classes"
        if len(teacher_shape) != len(student_shape) or any(
            None not in (a, b) and a != b
            for a, b in zip(teacher_shape[1:-1], student_shape[1:-1])
        ):
            raise ValueError(
                f"Distillation term '{self.name}': teacher and student "
                "outputs must have the same shape (one prediction per "
                f"{'position' if sequence else 'sample'}). Received: teacher "
                f"shape {teacher_shape}, student shape {student_shape}"
            )
        widths = teacher_shape[-1], student_shape[-1]
        if self.vocabulary_size is not None:
            if any(w is not None and w < self.vocabulary_size for w in widths):
                raise ValueError(
                    f"Distillation term '{self.name}' compares the first "
                    f"vocabulary_size={self.vocabulary_size} classes, but a "
                    "model returns fewer. Set `vocabulary_size` to the size "
                    "both models share. Received: teacher shape "
                    f"{teacher_shape}, student shape {student_shape}"
                )
        elif None not in widths and widths[0] != widths[1]:
            raise ValueError(
                f"Distillation term '{self.name}': teacher and student "
                f"must have the same {what} (the teacher has {widths[0]}, "
                f"the student {widths[1]}): distillation compares "
                "distributions over the same classes. "
                "If one model's extra rows are unused padding (a vocabulary "
                "padded to a multiple of 64, say), pass `vocabulary_size=` "
                "the shared size; otherwise the models cannot be distilled "
                "into each other token by token. Received: teacher shape "
                f"{teacher_shape}, student shape {student_shape}"
            )
        width = self.vocabulary_size or student_shape[-1]
        if width == 1 and self.loss != "mse":
            raise ValueError(_SINGLE_LOGIT)

    def _positions_weight(self, x, logits, sample_weight):
        """The sample weights, or the inputs' padding mask for sequences."""
        if sample_weight is not None or len(logits.shape) < 3:
            return sample_weight
        if isinstance(x, dict) and "padding_mask" in x:
            mask = x["padding_mask"]
            expected = tuple(logits.shape)[:-1]
            if len(mask.shape) != len(expected) or any(
                None not in (a, b) and a != b
                for a, b in zip(mask.shape, expected)
            ):
                raise ValueError(
                    f"Distillation term '{self.name}' weighs positions by the "
                    "inputs' `padding_mask`, whose shape must be the logits' "
                    "without the vocabulary axis. Pass the weights as "
                    "`sample_weight` instead. Received: padding_mask shape "
                    f"{tuple(mask.shape)}, logits shape {tuple(logits.shape)}"
                )
            return ops.cast(mask, "float32")
        return None

    def reduce(self, values, sample_weight):
        if self.reduction == "sum_over_batch_size":
            return super().reduce(values, sample_weight)
        weights = position_weights(values, sample_weight)
        # Divided by the weight of the whole global batch, so that several
        # replicas give the mean over all real tokens, as one device does
        # (Keras's own 'mean_with_sample_weight' divides per replica).
        count = replica_mean(ops.sum(weights))
        total = ops.sum(values * weights)
        return scale_for_distribution(total / ops.maximum(count, 1e-12))

    def _target(self, y, logits):
        """The labels as a one-hot mask, and which rows have a label."""
        if y is None or not hasattr(y, "shape"):
            raise ValueError(
                f"Distillation term '{self.name}' with loss='dkd' separates "
                "the target class from the others, so it needs labels: pass "
                "them to `fit`, or use loss='kl' for label-free "
                f"distillation. Received: labels {y!r}"
            )
        classes = self.vocabulary_size or logits.shape[-1]
        if one_hot_labels(y, logits):
            labels = ops.argmax(y, axis=-1)
        else:
            labels = y
            if len(labels.shape) == len(logits.shape):
                labels = ops.squeeze(labels, axis=-1)
        labels = ops.cast(labels, "int32")
        labelled = ops.logical_and(labels >= 0, labels < classes)
        return ops.where(labelled, labels, 0), ops.cast(labelled, "float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            teacher=keras.saving.serialize_keras_object(self.teacher),
            loss=self.loss,
            temperature=self.hyperparameter_config("temperature"),
            beta=self.beta,
            standardize=self.standardize,
            reduction=self.reduction,
            vocabulary_size=self.vocabulary_size,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["teacher"] = keras.saving.deserialize_keras_object(
            config["teacher"]
        )
        config["temperature"] = schedules.deserialize(config["temperature"])
        return super().from_config(config)
