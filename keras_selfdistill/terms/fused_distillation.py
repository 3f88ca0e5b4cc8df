"""`FusedDistillation`: token-level KD that never builds all the logits."""

import functools

import keras
from keras import ops

from keras_selfdistill import _arguments
from keras_selfdistill import _fused
from keras_selfdistill import _heads
from keras_selfdistill import _rows
from keras_selfdistill import ops as ksd_ops
from keras_selfdistill import targets as ksd_targets
from keras_selfdistill._forward import DEEPEST_FEATURES
from keras_selfdistill.terms.distillation import Distillation
from keras_selfdistill.terms.distillation import position_weights
from keras_selfdistill.terms.term import Term
from keras_selfdistill.terms.term import replica_mean
from keras_selfdistill.terms.term import scale_for_distribution


def default_chunk(head):
    """Positions projected at once: a sixteenth of the hidden width, and
    at least the rows of 4M logits (16 MB in float32, as `Distillation`'s
    chunks), below which a CPU's matrix products and the loop's overhead
    cost more than the memory saved.

    At least 16 rows, and 64 on TensorFlow: the head's weight gradient is
    a product over the chunk's rows, which TensorFlow's CPU kernel runs
    2.7× slower per operation with 16 rows than with 1,024 and 1.4× with
    64, and each chunk's gradient is a new kernel-sized sum (TensorFlow
    adds in place on one core only); XLA's loop (JAX) accumulates in place
    and was fastest at 16 (`benchmarks/RESULTS.md`).
    """
    floor = 64 if keras.backend.backend() == "tensorflow" else 16
    return max(floor, head.width // 16, _rows.CHUNK_ELEMENTS // head.vocabulary)


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class FusedDistillation(Distillation):
    """`Distillation` fused with the language model's head.

    At a vocabulary of 128k–256k and thousands of tokens a step, one
    float32 `[tokens, vocabulary]` logit tensor is gigabytes, and the
    loss, not the model, decides what fits. This term never builds it. In
    the training step the student's forward stops at its final hidden
    states (the input of its output layer); the term projects a chunk of
    positions at a time through the student's head and the teacher's,
    computes the divergence (and, with `label_loss`, the label
    cross-entropy) on that chunk, and computes the gradients with respect
    to the hidden states and the head's weights in the same loop, as
    Liger-Kernel's fused linear losses and Apple's Cut Cross-Entropy do.
    What is left of the loss's memory is about the size of the head's
    weight gradient; `benchmarks/RESULTS.md` has the measurements.

    The values are `Distillation`'s: every loss kind and option of it
    (`"kl"`, `"reverse_kl"`, `"jsd"` with `beta`, `"dkd"`, `"mse"`,
    `temperature`, `standardize`, `vocabulary_size`, both reductions,
    padding masks, `xi`) is computed row by row, and the tests compare
    the loss and its gradients with the unfused term's.

    The heads: a `Dense` output layer without activation, or a
    `ReversibleEmbedding` called in reverse (a KerasHub `CausalLM`'s
    head, tied to the token embedding as Gemma's is, or untied). A
    frozen student head (`trainable = False`) gets no weight gradient;
    the teacher's head never does. The teacher is a model with one such
    head (`FrozenModel`, `EMA`, a `Snapshot` of one model), or any
    teacher that returns dense targets (a dense cache, an `Ensemble`),
    whose targets are then read a chunk of rows at a time.

    Because no logits exist in the training step, the distiller is
    compiled without `loss` and `metrics`: with `label_loss=True` the
    term computes the label cross-entropy in the same loop (what a
    compiled `SparseCategoricalCrossentropy(from_logits=True)` would,
    reduced by the term's `reduction`; labels outside `[0, vocabulary)`,
    such as `-100`, count nothing) and reports it as `supervised_loss`.
    The objective is then `supervised + weight · distillation`, or with
    `xi` set `(1 − ξ) · supervised + ξ · weight · distillation`, as a
    `Distillation` term with a compiled loss gives. `evaluate` and
    `predict` run the whole student.

    Reference:

    - [Hsu et al., 2024](https://arxiv.org/abs/2410.10989) (Liger-Kernel;
      the fused linear KL and JSD of PR #1423)
    - [Wijmans et al., 2025](https://arxiv.org/abs/2411.09009) (Cut
      Cross-Entropy)

    Args:
        teacher: As for `Distillation`.
        loss, temperature, weight, xi, beta, standardize, reduction,
            vocabulary_size: As for `Distillation`.
        label_loss: Whether the term also computes the label
            cross-entropy (needs integer labels). Required with `xi`.
            Defaults to `False`.
        chunk_size: Positions projected at once. Defaults to `None`:
            the hidden width over 16 (one chunk's temporaries then stay
            near half the head's size), at least the rows of 4M logits,
            and at least 16 rows (64 on TensorFlow) (`default_chunk`).
        recompute: Whether the backward pass projects each chunk again
            instead of keeping the gradients the forward loop computed:
            one more projection per chunk, nothing held between the
            passes. Defaults to `False`.
        name: Name of the term. Defaults to `"fused_distillation"`.

    Example:

    ```python
    distiller = keras_selfdistill.Distiller(
        student_lm,
        terms=[keras_selfdistill.terms.FusedDistillation(
            teacher_lm, temperature=2.0, label_loss=True, xi=0.5)],
    )
    distiller.compile(optimizer="adam")
    distiller.fit(token_ds, epochs=1)
    ```
    """

    reads_forward = True
    computes_output = True

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
        label_loss=False,
        chunk_size=None,
        recompute=False,
        name=None,
        **kwargs,
    ):
        super().__init__(
            teacher,
            loss=loss,
            temperature=temperature,
            weight=weight,
            xi=xi,
            beta=beta,
            standardize=standardize,
            reduction=reduction,
            vocabulary_size=vocabulary_size,
            name=name,
            **kwargs,
        )
        if not isinstance(label_loss, bool):
            raise TypeError(
                "`label_loss` must be True (the term computes the label "
                "cross-entropy) or False. Received: "
                f"label_loss={label_loss!r}"
            )
        if xi is not None and not label_loss:
            raise ValueError(
                "`xi` weighs the label loss against the distillation, and "
                "this term computes the label loss itself: pass "
                f"`label_loss=True` with it. Received: xi={xi!r}, "
                "label_loss=False"
            )
        if chunk_size is not None and (
            not _arguments.is_integer(chunk_size) or chunk_size < 1
        ):
            raise ValueError(
                "`chunk_size` is the number of positions projected at once: "
                f"an integer >= 1, or None. Received: chunk_size={chunk_size!r}"
            )
        if not isinstance(recompute, bool):
            raise TypeError(
                f"`recompute` must be True or False. Received: "
                f"recompute={recompute!r}"
            )
        self.label_loss = label_loss
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.recompute = recompute
        self._student_head = None
        self._teacher_head = None

    @property
    def taps(self):
        return (DEEPEST_FEATURES,)

    def forward(self, outputs, training=None):
        return {self._hidden_key: outputs[DEEPEST_FEATURES]}

    @property
    def _hidden_key(self):
        return f"{self.name}_hidden_states"

    @property
    def supervises(self):
        return self.label_loss

    @property
    def _target_kind(self):
        if self._teacher_head is not None:
            return ksd_targets.LOGITS
        return self.teacher.target_kind

    def attach(self, student):
        super().attach(student)
        head = _heads.output_head(student, "student")
        models = self.teacher.feature_models()
        teacher_head = None
        if len(models) == 1:
            teacher_head = _heads.output_head(models[0], "teacher")
            teacher_width = teacher_head.vocabulary
            teacher_shape = tuple(teacher_head.kernel.shape)
        elif models:
            raise ValueError(
                f"Term '{self.name}' projects the teacher's hidden states "
                "through its head, but the teacher averages the outputs of "
                f"{len(models)} models, which is no one head's logits. Use "
                "`Distillation`, or cache the teacher's targets. Received: "
                f"{len(models)} teacher models"
            )
        else:
            teacher_shape = self._teacher_output_shape(student)
            teacher_width = teacher_shape[-1]
        self._check_vocabularies(head, teacher_width, teacher_shape)
        if teacher_head is not None:
            self._check_splits(head, teacher_head)
        self._student_head = head
        self._teacher_head = teacher_head

    def _check_splits(self, student, teacher):
        """Both heads' vocabularies split over the same mesh axes, or
        neither: a chunk's two logits are then laid out alike."""
        splits = student.vocabulary_split(), teacher.vocabulary_split()
        if splits[0] != splits[1] and None in splits:
            which = "student" if splits[1] is None else "teacher"
            raise ValueError(
                f"Term '{self.name}': the layout map splits the vocabulary "
                f"of the {which}'s head only, so every chunk's logits would "
                "be gathered across devices for the other. Split both heads' "
                "vocabulary over the same mesh axis, or neither. Received: "
                f"student head {student.describe()} split {splits[0]}, "
                f"teacher head {teacher.describe()} split {splits[1]}"
            )

    def _teacher_output_shape(self, student):
        for teacher in self.teacher.walk():
            manifest = getattr(teacher, "manifest", None)
            if manifest is not None:
                return tuple(manifest["output_shape"])
            model = getattr(teacher, "model", None)
            if isinstance(model, keras.Model):
                return tuple(model.output_shape)
        return tuple(student.output_shape)

    def _check_vocabularies(self, head, teacher_width, teacher_shape):
        student_shape = tuple(head.kernel.shape)
        widths = (teacher_width, head.vocabulary)
        if self.vocabulary_size is not None:
            if any(w is not None and w < self.vocabulary_size for w in widths):
                raise ValueError(
                    f"Term '{self.name}' compares the first "
                    f"vocabulary_size={self.vocabulary_size} classes, but a "
                    "head has fewer. Received: teacher shape "
                    f"{teacher_shape}, student head shape {student_shape}"
                )
        elif None not in widths and widths[0] != widths[1]:
            raise ValueError(
                f"Term '{self.name}': the teacher's vocabulary "
                f"({widths[0]}) and the student's ({widths[1]}) differ. If "
                "one model's extra rows are unused padding, pass "
                "`vocabulary_size=` the shared size; otherwise the models "
                "cannot be distilled token by token. Received: teacher "
                f"shape {teacher_shape}, student head shape {student_shape}"
            )

    def compute_loss(self, x, y, y_pred, sample_weight, step, epoch):
        return self.compute_objective(x, y, y_pred, sample_weight, step, epoch)[
            1
        ]

    def compute_objective(self, x, y, y_pred, sample_weight, step, epoch):
        if self._student_head is None:
            raise ValueError(
                f"Term '{self.name}' is not attached to a student: use it "
                "in a `keras_selfdistill.Distiller`."
            )
        hidden = y_pred[self._hidden_key]
        leading = ops.shape(hidden)[:-1]
        flat = ops.reshape(hidden, (-1, hidden.shape[-1]))
        temperature = ops.cast(
            self.hyperparameter("temperature", step, epoch), "float32"
        )
        source, teacher_rows, mask, constants = self._teacher_rows(
            x, temperature
        )
        weights = position_weights(
            ops.ones(leading, "float32"),
            self._positions_weight(x, hidden, sample_weight),
        )
        rows_mask = ops.ones(leading, "float32")
        if mask is not None:
            rows_mask = position_weights(rows_mask, mask)
        labels, labelled = self._labels(y, ops.shape(flat)[0])
        coefficient = self._reduction(ops.reshape(weights, (-1,)))
        rows_mask = ops.reshape(rows_mask, (-1,))
        weight = ops.cast(self.hyperparameter("weight", step, epoch), "float32")
        factor, scale = self.mixing(step, epoch, mask)
        label_scale = 1.0
        if scale is not None:
            label_scale = ops.reshape(
                position_weights(ops.ones(leading, "float32"), scale), (-1,)
            )
        if not self.label_loss:
            label_scale = 0.0
        # Reported: the divergence as `Distillation` reports it, and the
        # label loss as it enters the objective (the `Distiller`'s
        # `supervised_loss`, `1 − ξ` times the cross-entropy with `xi`).
        report = ops.stack(
            [coefficient * rows_mask, label_scale * coefficient * labelled],
            axis=-1,
        )
        objective_weights = ops.stack(
            [weight * ops.cast(factor, "float32") * report[:, 0], report[:, 1]],
            axis=-1,
        )
        head = self._student_head
        objective, totals = _fused.head_loss(
            functools.partial(self._row_values, source),
            flat,
            ops.convert_to_tensor(head.kernel),
            None if head.bias is None else ops.convert_to_tensor(head.bias),
            [labels] + teacher_rows,
            objective_weights,
            report,
            constants=[temperature] + constants,
            transposed=head.transposed,
            chunk=self.chunk_size or default_chunk(head),
            recompute=self.recompute,
            train_head=head.trainable,
        )
        supervised = totals[1] if self.label_loss else None
        return objective, totals[0], supervised

    def _teacher_rows(self, x, temperature):
        """`(source, rows, mask, constants)` of the teacher for the loop.

        `source` says what the rows are: `"head"`, its hidden states (its
        head's weights are the constants); `"dense"`, its targets;
        `"top_k"` or `"sampled"`, a sparse cache's log-probabilities, ids
        and the rest mass or the importance weights.
        """
        head = self._teacher_head
        if head is not None:
            hidden, mask = self.teacher.features_and_mask(x, DEEPEST_FEATURES)
            constants = [ops.stop_gradient(ops.convert_to_tensor(head.kernel))]
            if head.bias is not None:
                constants.append(
                    ops.stop_gradient(ops.convert_to_tensor(head.bias))
                )
            rows = [ops.reshape(hidden, (-1, hidden.shape[-1]))]
            return "head", rows, mask, constants
        targets, mask = self.teacher.targets_and_mask(x, None, temperature)
        if not isinstance(targets, dict):
            targets = ops.cast(targets, "float32")
            rows = [ops.reshape(targets, (-1, targets.shape[-1]))]
            return "dense", [ops.stop_gradient(r) for r in rows], mask, []
        kind = self.teacher.kind
        names = ("log_probs", "ids", "rest" if kind == "top_k" else "weights")
        rows = []
        leading = len(targets["ids"].shape) - 1
        for name in names:
            value = targets[name]
            if name == "ids":
                value = ops.cast(value, "int32")
            rows.append(
                ops.reshape(value, (-1,) + tuple(value.shape[leading:]))
            )
        return kind, [ops.stop_gradient(r) for r in rows], mask, []

    def _labels(self, y, rows):
        """The flat int32 labels (0 where none) and which rows have one."""
        needed = self.label_loss or self.loss == "dkd"
        if not needed:
            return -ops.ones((rows,), "int32"), ops.zeros((rows,), "float32")
        if y is None or not hasattr(y, "shape"):
            raise ValueError(
                f"Term '{self.name}' computes "
                + ("the label cross-entropy" if self.label_loss else "DKD")
                + " and needs integer labels: pass them to `fit`. Received: "
                f"labels {y!r}"
            )
        if "int" not in str(y.dtype):
            raise ValueError(
                f"Term '{self.name}' reads integer labels (token ids), as "
                "`SparseCategoricalCrossentropy` does. Received: labels of "
                f"dtype {y.dtype} and shape {tuple(y.shape)}"
            )
        labels = ops.reshape(ops.cast(y, "int32"), (-1,))
        classes = self._student_head.vocabulary
        has = ops.logical_and(labels >= 0, labels < classes)
        # -1 marks a row without a label, for the rows' function.
        return ops.where(has, labels, -1), ops.cast(has, "float32")

    def _reduction(self, weights):
        """Per-row coefficients `c` with `reduce(values) = Σ c · values`."""
        if self.reduction == "sum_over_batch_size":
            # Keras's reduction of ones is 1, over replicas.
            scale = Term.reduce(self, ops.ones((1,), "float32"), None)
            count = ops.cast(ops.shape(weights)[0], "float32")
            return weights * scale / count
        count = replica_mean(ops.sum(weights))
        return scale_for_distribution(weights / ops.maximum(count, 1e-12))

    def _row_values(self, source, student_logits, labels, *args):
        """`(n, 2)`: the divergence and the label cross-entropy per row.

        `args` are the teacher's rows and then the constants, as
        `_teacher_rows` gives them after the temperature.
        """
        count = {"head": 1, "dense": 1}.get(source, 3)
        teacher, (temperature, *teacher_head) = args[:count], args[count:]
        if source == "head":
            teacher_logits = _heads.project(
                teacher[0],
                *teacher_head,
                transposed=self._teacher_head.transposed,
            )
        elif source == "dense":
            teacher_logits = teacher[0]
        if source in ("top_k", "sampled"):
            log_probs, ids, extra = teacher
            if source == "top_k":
                beta = 0.5 if self.beta is None else self.beta
                divergence = ksd_ops.top_k_divergence(
                    ids,
                    log_probs,
                    extra,
                    student_logits,
                    self.loss,
                    beta,
                    temperature,
                )
            else:
                divergence = ksd_ops.sampled_kl_divergence(
                    ids, extra, log_probs, student_logits, temperature
                )
            return self._with_labels(divergence, student_logits, labels)
        labelled = labels >= 0
        safe = ops.where(labelled, labels, 0)
        if self.loss == "dkd":
            divergence = self._divergence(
                teacher_logits, student_logits, safe, temperature
            )
            # As `Distillation`: a row without a label in the compared
            # classes has no target class.
            classes = self.vocabulary_size or student_logits.shape[-1]
            divergence = divergence * ops.cast(
                ops.logical_and(labelled, labels < classes), "float32"
            )
        else:
            divergence = self._divergence(
                teacher_logits, student_logits, temperature
            )
        return self._with_labels(divergence, student_logits, labels)

    def _with_labels(self, divergence, student_logits, labels):
        """The divergence beside the rows' label cross-entropy."""
        if not self.label_loss:
            return ops.stack([divergence, ops.zeros_like(divergence)], -1)
        # `logsumexp − the label's logit`, the label's logit picked with a
        # one-hot product: a gather's gradient is a scatter, several times
        # slower than the elementwise product's on CPU.
        picked = ops.sum(
            ops.one_hot(labels, student_logits.shape[-1]) * student_logits,
            axis=-1,
        )
        cross_entropy = ops.logsumexp(student_logits, axis=-1) - picked
        return ops.stack([divergence, cross_entropy], -1)

    def get_config(self):
        config = super().get_config()
        config.update(
            label_loss=self.label_loss,
            chunk_size=self.chunk_size,
            recompute=self.recompute,
        )
        return config
