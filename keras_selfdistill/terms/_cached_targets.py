"""What a `Distillation` term does with cached teachers.

Which losses and options a cache allows, the one temperature a cache that
cannot be re-tempered was written at (its manifest's, which the term's
must equal), and the loss on sparse (top-k, sampled) targets.
"""

from keras import ops

from keras_selfdistill import _rows
from keras_selfdistill import ops as ksd_ops
from keras_selfdistill.teachers.cached import Cached
from keras_selfdistill.teachers.teacher import num_classes

# Losses that sparse targets support: the others need the teacher's
# probability of every class.
SPARSE_LOSSES = {"top_k": ("kl", "reverse_kl", "jsd"), "sampled": ("kl",)}

_WHY_FIXED = {
    "dense": "an ensemble's mixture",
    "top_k": "the mass outside the top-k classes is unknown",
    "sampled": "the mass outside the drawn classes is unknown",
}


def check_temperature(term, value):
    """Raises unless `value` is the temperature of every cache that the
    term reads and that cannot be re-tempered."""
    for teacher in term.teacher.walk():
        if (
            isinstance(teacher, Cached)
            and not teacher.any_temperature
            and value != teacher.temperature
        ):
            raise ValueError(
                f"Distillation term '{term.name}' reads {teacher.kind} "
                f"targets written at temperature {teacher.temperature}, "
                f"which cannot be re-tempered ({_WHY_FIXED[teacher.kind]}): "
                "the term's temperature must stay that number. Received: "
                f"temperature={value!r}"
            )


def check(term, student):
    """Refuses the settings the term's cached teachers cannot serve."""
    for teacher in term.teacher.walk():
        if isinstance(teacher, Cached) and term.loss == "mse":
            raise ValueError(
                f"Distillation term '{term.name}' compares raw logits "
                "(loss='mse'), but a cache stores log-probabilities, "
                "which differ from the logits by a constant per row. "
                "Use a softmax loss ('kl', 'reverse_kl', 'jsd', 'dkd') "
                "or the live teacher. Received: loss='mse'"
            )
        if not isinstance(teacher, Cached) or teacher.kind == "dense":
            continue
        kind = teacher.kind
        where = f"Distillation term '{term.name}' reads {kind} targets"
        if teacher is not term.teacher:
            raise ValueError(
                f"{where} inside an Ensemble: a mixture of sparse targets "
                "has no probability for the classes one member left out. "
                "Cache the ensemble itself (`write_teacher_outputs` takes "
                "an Ensemble). Received: teacher="
                f"{type(term.teacher).__name__}"
            )
        if term.loss not in SPARSE_LOSSES[kind]:
            raise ValueError(
                f"{where}, which support loss in {SPARSE_LOSSES[kind]}: "
                "the others need the teacher's probability of every class. "
                f"Received: loss={term.loss!r}"
            )
        if term.standardize or term.vocabulary_size is not None:
            raise ValueError(
                f"{where}, which hold log-probabilities of some classes "
                "only: `standardize` and `vocabulary_size` need every "
                f"logit. Received: standardize={term.standardize}, "
                f"vocabulary_size={term.vocabulary_size}"
            )
        width = teacher.manifest["output_shape"][-1]
        classes = num_classes(student)
        if classes is not None and classes != width:
            raise ValueError(
                f"{where} over {width} classes, but the student has "
                f"{classes}: teacher and student must have the same "
                "number of classes (vocabulary)."
            )
    check_temperature(term, term.temperature)


def sparse_values(term, targets, student_logits, temperature):
    """Per-position loss on a cached teacher's top-k or sampled targets."""
    ids = ops.cast(targets["ids"], "int32")
    if len(ids.shape) != len(student_logits.shape):
        raise ValueError(
            f"Distillation term '{term.name}': the cached targets have "
            f"shape {tuple(ids.shape)} (k last), the student's outputs "
            f"{tuple(student_logits.shape)}: one prediction per position "
            "is needed."
        )
    if term.teacher.kind == "top_k":
        beta = 0.5 if term.beta is None else term.beta

        def function(log_probs, student, ids, rest, temperature):
            return ksd_ops.top_k_divergence(
                ids, log_probs, rest, student, term.loss, beta, temperature
            )

        rows = (ids, targets["rest"])
    else:

        def function(log_probs, student, ids, weights, temperature):
            return ksd_ops.sampled_kl_divergence(
                ids, weights, log_probs, student, temperature
            )

        rows = (ids, targets["weights"])
    return _rows.per_row(
        function,
        targets["log_probs"],
        student_logits,
        rows=rows,
        scalars=(ops.cast(temperature, "float32"),),
        chunk_elements=term._chunk_elements,
    )
