"""Which terms may train together: the rules, in one place.

`keras_selfdistill.Distiller` calls `compose` once, at construction; it
knows no term or teacher by name, and every rule about a combination of
terms (or of their teachers) is here.
"""

import collections

from keras_selfdistill.teachers.teacher import final_activation
from keras_selfdistill.teachers.teacher import refuse_probabilities
from keras_selfdistill.terms.term import Term

SUPERVISED_LOSS = "supervised_loss"

Composition = collections.namedtuple(
    "Composition", ["output_key", "loss_metrics", "schedules"]
)
Composition.__doc__ = """What the distiller serves for its terms.

`output_key`: the key of the logits in a subclassed student's output dict
(`Term.output_key`), or `None`. `loss_metrics`: the metric name of each
term that adds a loss, in order. `schedules`: `(term, hyperparameter,
metric name)` of every hyperparameter given as a schedule.
"""


def compose(student, terms):
    """Checks that `terms` can train `student` together, and attaches them.

    Refuses what is not a list of terms, two terms that rescale the
    supervised loss or replace the batch, a batch-replacing term beside
    rows joined from the pipeline, a student that outputs probabilities,
    terms that disagree on the logits' key, and metric names used twice.
    Calls each term's `attach(student)`. Returns a `Composition`.
    """
    _check_list(terms)
    undeclared = [t.name for t in terms if t.taps and not t.reads_forward]
    if undeclared:
        raise ValueError(
            f"Terms {undeclared} declare `taps` but not `reads_forward = "
            "True`, so they would receive the student's logits instead of "
            "the dict with their taps. Set `reads_forward = True` on the "
            "class. Received: reads_forward=False"
        )
    mixing = [t.name for t in terms if t.mixes_labels]
    if len(mixing) > 1:
        raise ValueError(
            "At most one term may rescale the supervised loss (`xi`, or "
            "`scale_final_label` of AuxiliaryExits): several scales would "
            "be ambiguous. Use `weight` on the others. Received: "
            f"terms {mixing}"
        )
    unserved = [
        t.name
        for t in terms
        if t.computes_output
        and type(t).compute_objective is Term.compute_objective
    ]
    if unserved:
        raise ValueError(
            f"Terms {unserved} set `computes_output = True` but do not "
            "implement `compute_objective`, which the `Distiller` calls "
            "for them instead of `compute_loss`. Implement it. Received: "
            "computes_output=True"
        )
    fused = [t.name for t in terms if t.computes_output]
    if len(fused) > 1:
        raise ValueError(
            "At most one term may compute the student's output layer "
            "itself: the training forward stops at the hidden states once. "
            f"Received: terms {fused}"
        )
    _check_shared_banks(terms)
    rewriting = [t.name for t in terms if t.rewrites_batch]
    if len(rewriting) > 1:
        raise ValueError(
            "At most one term may replace the training batch (on-policy "
            "samples, teacher generations): the second would discard "
            f"the first's batch. Received: terms {rewriting}"
        )
    joined = [
        teacher.name
        for term in terms
        for root in term.teachers
        for teacher in root.walk()
        if teacher.joins_rows
    ]
    if rewriting and joined:
        raise ValueError(
            f"Term '{rewriting[0]}' replaces the training batch inside "
            "the step, but a cached teacher holds outputs for the "
            "dataset's own inputs, joined before the step: its targets "
            "would belong to other sequences. Use the live teacher with "
            f"on-policy or generated batches. Received: cached teachers "
            f"{joined}"
        )
    activation = final_activation(student)
    if terms and activation is not None:
        refuse_probabilities("student", student.name, activation)
    for term in terms:
        term.attach(student)
    keys = {t.output_key for t in terms} - {None}
    if len(keys) > 1:
        raise ValueError(
            "The terms disagree on the key of the logits in the "
            f"student's output dict. Received: output keys {sorted(keys)}"
        )
    loss_terms = [term for term in terms if term.has_loss]
    loss_metrics = _loss_metric_names(loss_terms)
    schedules = [
        (term, name, f"{metric[: -len('_loss')]}_{name}")
        for term, metric in zip(loss_terms, loss_metrics)
        for name in term.scheduled_hyperparameters
    ]
    own = [m.name for t in terms for m in t.metrics]
    taken = {SUPERVISED_LOSS, *loss_metrics, *(n for _, _, n in schedules)}
    clashes = sorted({n for n in own if n in taken or own.count(n) > 1})
    if clashes:
        raise ValueError(
            f"Two terms report metrics under the same names {clashes}; "
            "give the terms distinct `name`s. Received: terms "
            f"{[t.name for t in terms]}"
        )
    return Composition(keys.pop() if keys else None, loss_metrics, schedules)


def _check_list(terms):
    if isinstance(terms, Term) or not isinstance(terms, (list, tuple)):
        raise TypeError(
            "`terms` must be a list of `keras_selfdistill.terms.Term`s. "
            f"Received: terms={terms!r}"
        )
    for term in terms:
        if not isinstance(term, Term):
            raise TypeError(
                "Every entry of `terms` must be a "
                "`keras_selfdistill.terms.Term`, e.g. "
                "`keras_selfdistill.terms.Distillation(teacher)`. "
                f"Received: {term!r} of type {type(term).__name__}"
            )


def _loss_metric_names(terms):
    """`<name>_loss` of each term, numbered where two share a name."""
    names, result = {SUPERVISED_LOSS}, []
    for term in terms:
        metric_name, suffix = f"{term.name}_loss", 1
        while metric_name in names:
            metric_name, suffix = f"{term.name}_{suffix}_loss", suffix + 1
        names.add(metric_name)
        result.append(metric_name)
    return result


def _check_shared_banks(terms):
    """Refuses a teacher that writes rows by id read by two terms.

    Teachers are shared freely otherwise (one teacher model for logits and
    features). A bank writes the step's predictions when it is read, so a
    second term would read the rows the first just wrote.
    """
    readers = collections.defaultdict(list)
    for term in terms:
        for teacher in term.teachers:
            for leaf in {id(t): t for t in teacher.walk()}.values():
                if leaf.writes_by_id:
                    readers[id(leaf)].append((leaf, term.name))
    for shared in readers.values():
        if len(shared) > 1:
            raise ValueError(
                f"The {type(shared[0][0]).__name__} teacher "
                f"'{shared[0][0].name}' writes the step's predictions when "
                "it is read, so only one term may read it (a second would "
                "read the rows the first just wrote). Give each term its "
                "own. Received: terms "
                f"{[name for _, name in shared]}"
            )
