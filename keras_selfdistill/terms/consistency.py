import keras
from keras import ops

from keras_selfdistill import _arguments
from keras_selfdistill._forward import OUTPUT
from keras_selfdistill._forward import VIEW
from keras_selfdistill.ops import one_hot_labels
from keras_selfdistill.teachers.cached import Cached
from keras_selfdistill.teachers.frozen_model import as_teacher
from keras_selfdistill.terms.term import Term

_LOSSES = ("kl", "mse")


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class Consistency(Term):
    """Teaches a strongly augmented view with the weak view's prediction.

    Two-view consistency (FixMatch, MDCS, UDA; DINO-style with an `EMA`
    teacher): the batch as the input pipeline gives it is the weak view,
    `augment(x)` the strong one. The student runs once on both,
    concatenated (as FixMatch's and MDCS's code do, so batch
    normalisation sees both); the compiled loss and metrics use the weak
    view. The target is the weak view's prediction without gradient, or,
    with `teacher`, the teacher's on the weak view, sharpened by
    `temperature`:

    `Σ_i m_i · w_i · KL(softmax(t_i / T) ‖ softmax(s_i))`

    or, with `loss="mse"`, the mean teacher's consistency cost (Tarvainen
    & Valpola; their code's `softmax_mse_loss`, the squared differences
    summed over classes and divided by their number) in place of the KL:
    `mean_c (softmax(s_i)_c − softmax(t_i / T)_c)²`,

    with `s_i` the student's logits on the strong view, `T = 0` giving
    one-hot pseudo-labels (FixMatch's cross-entropy with `argmax`), `m_i`
    the mask and `w_i` the dynamic weight below; the sum is divided by the
    batch size (and weighted by `sample_weight`) as Keras reduces the
    compiled loss, so masked samples count as zeros, as in FixMatch.

    - `threshold` (FixMatch's τ, 0.95 there): keep samples whose weak-view
      confidence `max softmax(t_i)` reaches it.
    - `correct_only` (MDCS's confident instance sampling): keep samples
      whose weak-view prediction is their label. MDCS divides by the
      number kept instead of the batch size; here that count is reported
      (see below) and the reduction stays Keras's.
    - `dynamic_weight` `γ`: `w_i = 1 + γ · (1 − softmax(s_i)[argmax t_i])`,
      up-weighting samples whose strong view disagrees with the weak
      one's class (the per-sample corrective weighting of DCS, in our own
      form: the paper's exact weighting is not reproduced).

    Semi-supervised training: mark unlabelled samples with the compiled
    loss's `ignore_class` (e.g. `-1` with
    `SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)`),
    in the same batches as labelled ones. They get no supervised loss,
    pass `correct_only` unchecked, and learn from consistency alone.

    The fraction of the batch that passed the mask is the metric
    `<name>_mask_rate` (training only).

    Reference:

    - [Sohn et al., 2020](https://arxiv.org/abs/2001.07685) (FixMatch)
    - [Zhao et al., 2023](https://arxiv.org/abs/2308.09922) (MDCS)
    - [Xie et al., 2020](https://arxiv.org/abs/1904.12848) (UDA)
    - [Caron et al., 2021](https://arxiv.org/abs/2104.14294) (DINO)
    - [Tarvainen & Valpola, 2017](https://arxiv.org/abs/1703.01780) (mean
      teacher; `keras_selfdistill.recipes.mean_teacher` has its setting)

    Args:
        augment: The strong augmentation: a Keras layer (e.g.
            `keras.layers.RandAugment`) or a `keras.Sequential` of them,
            called with `training=True` on the student's inputs; it must
            keep their shape.
        teacher: `None` (the student's own weak view), a `keras.Model`
            (used frozen) or a `keras_selfdistill.teachers.Teacher` such as
            `EMA`. Defaults to `None`.
        temperature: Sharpening temperature `T >= 0` of the target alone
            (the student's logits stay untempered, and no `T²` factor);
            `0` gives one-hot pseudo-labels. Defaults to `1.0` (MDCS).
        threshold: Confidence in `[0, 1]` a weak view needs, or `None`.
            Defaults to `None`.
        correct_only: Whether only correctly predicted samples teach.
            Defaults to `False`.
        dynamic_weight: `γ >= 0` of the dynamic weights. Defaults to `0.0`.
        loss: `"kl"` or `"mse"` (the mean teacher's). Defaults to `"kl"`.
        weight: Non-negative number or schedule. Defaults to `1.0`.
        name: Name of the term. Defaults to `"consistency"`.

    Example:

    ```python
    ksd = keras_selfdistill
    strong = keras.layers.RandAugment(value_range=(0, 1))
    distiller = ksd.Distiller(student, [ksd.terms.Consistency(
        strong, temperature=0.0, threshold=0.95)])   # FixMatch
    distiller.compile("adam", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=-1))
    distiller.fit(x_mixed, y_with_minus_one_unlabelled, epochs=10)
    ```
    """

    reads_forward = True

    def __init__(
        self,
        augment,
        teacher=None,
        temperature=1.0,
        threshold=None,
        correct_only=False,
        dynamic_weight=0.0,
        weight=1.0,
        name=None,
        loss="kl",
        **kwargs,
    ):
        super().__init__(weight=weight, name=name, **kwargs)
        if loss not in _LOSSES:
            raise ValueError(
                f"Consistency `loss` must be one of {_LOSSES}: 'kl', or "
                "'mse', the mean teacher's squared difference of the "
                f"softmax outputs. Received: loss={loss!r}"
            )
        if not callable(augment):
            raise TypeError(
                "`augment` must be a Keras layer (or callable) producing the "
                f"strong view. Received: augment={augment!r}"
            )
        if not _arguments.is_number(temperature) or temperature < 0:
            raise ValueError(
                "`temperature` sharpens the target and must be a number "
                f">= 0 (0: one-hot). Received: temperature={temperature!r}"
            )
        if threshold is not None and (
            not _arguments.is_number(threshold) or not 0 <= threshold <= 1
        ):
            raise ValueError(
                "`threshold` is a confidence and must be in [0, 1] or None. "
                f"Received: threshold={threshold!r}"
            )
        if not isinstance(correct_only, bool):
            raise TypeError(
                "`correct_only` must be True or False. "
                f"Received: correct_only={correct_only!r}"
            )
        if not _arguments.is_number(dynamic_weight) or dynamic_weight < 0:
            raise ValueError(
                "`dynamic_weight` must be a number >= 0. "
                f"Received: dynamic_weight={dynamic_weight!r}"
            )
        self.augment = augment
        self.teacher = (
            None if teacher is None else as_teacher(teacher, "Consistency")
        )
        self.temperature = float(temperature)
        self.threshold = None if threshold is None else float(threshold)
        self.correct_only = correct_only
        self.dynamic_weight = float(dynamic_weight)
        self.loss = loss
        self.mask_rate = keras.metrics.Mean(name=f"{self.name}_mask_rate")

    @property
    def teachers(self):
        return [] if self.teacher is None else [self.teacher]

    @property
    def follows_student(self):
        # Without a teacher the target is the student's own weak view.
        return self.teacher is None or self.teacher.follows_student

    @property
    def _key(self):
        return f"{self.name}_strong"

    def attach(self, student):
        if self.teacher is not None:
            for teacher in self.teacher.walk():
                if isinstance(teacher, Cached) and teacher.kind != "dense":
                    raise ValueError(
                        f"Consistency '{self.name}' compares whole "
                        "distributions, but the cached teacher "
                        f"'{teacher.name}' holds {teacher.kind} targets. Use "
                        "a dense cache or a live teacher. Received: "
                        f"kind={teacher.kind!r}"
                    )
            self.teacher.attach(student)

    def view(self, inputs, training=None):
        if not training:
            return None
        strong = self.augment(inputs, training=True)
        given, made = keras.tree.flatten(inputs), keras.tree.flatten(strong)
        message = (
            f"Consistency '{self.name}': `augment` "
            f"({getattr(self.augment, 'name', type(self.augment).__name__)}) "
            "must keep the inputs' shape, batch size included, since both "
            "views run in one batch. Received: "
        )
        if len(given) != len(made):
            raise ValueError(
                f"{message}{len(given)} input tensors became {len(made)}"
            )
        for before, after in zip(given, made):
            shapes = tuple(before.shape), tuple(after.shape)
            if len(shapes[0]) != len(shapes[1]) or any(
                None not in pair and pair[0] != pair[1] for pair in zip(*shapes)
            ):
                raise ValueError(f"{message}{shapes[0]} became {shapes[1]}")
        return _same_batch_size(given, made, strong, message)

    def forward(self, outputs, training=None):
        if VIEW not in outputs:
            return {}
        return {self._key: outputs[VIEW][OUTPUT]}

    def compute_loss(self, x, y, y_pred, sample_weight, step, epoch):
        weak = ops.cast(y_pred[OUTPUT], "float32")
        strong = ops.cast(y_pred[self._key], "float32")
        teacher_mask = None
        if self.teacher is not None:
            # At temperature 1 either kind of target is logits.
            weak, teacher_mask = self.teacher.targets_and_mask(x, weak, 1.0)
            weak = ops.cast(weak, "float32")
        weak = ops.stop_gradient(weak)
        classes = weak.shape[-1]
        guess = ops.argmax(weak, axis=-1)
        if self.temperature == 0.0:
            target = ops.one_hot(guess, classes)
        else:
            target = ops.softmax(weak / self.temperature, axis=-1)
        log_student = ops.log_softmax(strong, axis=-1)
        if self.loss == "mse":
            values = ops.mean(
                ops.square(ops.exp(log_student) - target), axis=-1
            )
        else:
            log_target = ops.log(ops.maximum(target, 1e-30))
            values = ops.sum(target * (log_target - log_student), axis=-1)
        mask = ops.ones_like(values)
        if self.threshold is not None:
            confidence = ops.max(ops.softmax(weak, axis=-1), axis=-1)
            mask = mask * ops.cast(confidence >= self.threshold, "float32")
        if self.correct_only:
            mask = mask * self._correct(y, weak, guess)
        if teacher_mask is not None:
            mask = mask * ops.reshape(
                teacher_mask,
                ops.shape(teacher_mask) + (1,) * (len(mask.shape) - 1),
            )
        if self.dynamic_weight:
            agreement = ops.sum(
                ops.exp(log_student) * ops.one_hot(guess, classes), axis=-1
            )
            values = values * (
                1.0 + self.dynamic_weight * ops.stop_gradient(1.0 - agreement)
            )
        self.mask_rate.update_state(mask)
        return self.reduce(values * mask, sample_weight)

    def _correct(self, y, weak, guess):
        if y is None:
            raise ValueError(
                f"Consistency '{self.name}' with correct_only=True keeps the "
                "samples predicted as their label, so it needs labels. Pass "
                "labels to `fit` or set correct_only=False. Received: "
                "labels None"
            )
        if one_hot_labels(y, weak):
            return ops.cast(ops.equal(ops.argmax(y, axis=-1), guess), "float32")
        labels = y
        if len(labels.shape) == len(weak.shape):
            labels = ops.squeeze(labels, axis=-1)
        labels = ops.cast(labels, "int32")
        unlabelled = ops.logical_or(labels < 0, labels >= weak.shape[-1])
        hit = ops.equal(labels, ops.cast(guess, "int32"))
        return ops.cast(ops.logical_or(hit, unlabelled), "float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            augment=keras.saving.serialize_keras_object(self.augment),
            teacher=None
            if self.teacher is None
            else keras.saving.serialize_keras_object(self.teacher),
            temperature=self.temperature,
            threshold=self.threshold,
            correct_only=self.correct_only,
            dynamic_weight=self.dynamic_weight,
            loss=self.loss,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for name in ("augment", "teacher"):
            if config.get(name) is not None:
                config[name] = keras.saving.deserialize_keras_object(
                    config[name]
                )
        return super().from_config(config)


def _same_batch_size(given, made, strong, message):
    """`strong`, checked to hold the inputs' batch size where only running
    the step knows it (TensorFlow graphs; JAX traces static shapes)."""
    if keras.backend.backend() != "tensorflow":
        return strong
    import tensorflow as tf

    checks = [
        tf.debugging.assert_equal(
            tf.shape(after)[0],
            tf.shape(before)[0],
            message=f"{message}another batch size (strong view, inputs)",
        )
        for before, after in zip(given, made)
        if None in (before.shape[0], after.shape[0])
    ]
    if not checks:
        return strong
    with tf.control_dependencies(checks):
        return tf.nest.map_structure(tf.identity, strong)
