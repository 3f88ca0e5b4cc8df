"""What `Distiller.fit` does to the training data before Keras reads it.

In order: the checks (`keras_selfdistill.checks`), the rows of teachers
that declare `joins_rows` joined to the batch (cached outputs), the split
of a `tf.data` dataset into a checked first pass and the pipeline as given,
and the label-free NumPy batches that keep `sample_weight`. The distiller
calls `fit_arguments` and hands the result to `keras.Model.fit`; errors
of the pipeline's checks come back through `pipeline_error`.
"""

import keras
import numpy as np

from keras_selfdistill import checks
from keras_selfdistill.batch import is_dataset


def fit_arguments(distiller, arguments):
    """`keras.Model.fit`'s arguments for `distiller.fit(**arguments)`.

    `arguments` are those `fit` was called with, by name. Returns them with
    the training data checked (`check_data`) and joined to the rows of
    joining teachers; a `tf.data` dataset of known size read for more than
    one epoch is checked over its first pass only (`later_passes`); the
    distiller's training events first among the callbacks, which are
    checked against its moving targets, and the callbacks as a list.
    Under a multi-process JAX distribution, processes whose shards would
    run different numbers of steps are refused before any step.
    """
    arguments = dict(arguments)
    teachers = distiller.teachers
    id_limits = [t.num_samples for t in teachers if t.keyed_by_id]
    given = arguments.get("x")
    arguments["x"] = checks.check_fit_data(
        given,
        arguments.get("y"),
        distiller,
        min(id_limits) if id_limits else None,
        # A repeated id would make two rows race for one bank row; rows
        # joined from a cache are only read.
        unique_ids=any(t.writes_by_id for t in teachers),
    )
    joining = [t for t in teachers if t.joins_rows]
    later = later_passes(distiller, given, arguments, joining)
    if joining:
        arguments["x"], later = _join(
            joining, teachers, arguments["x"], given, later
        )
    if later is not None and arguments["x"] is not later:
        # One pass checked, then the pipeline as given: Keras reads the
        # one iterator for `steps_per_epoch` steps an epoch.
        arguments["steps_per_epoch"] = int(given.cardinality())
        arguments["x"] = arguments["x"].concatenate(later.repeat())
    if arguments.get("y") is None and "sample_weight" in arguments:
        _keep_label_free_weights(arguments)
    callbacks = arguments.get("callbacks") or []
    if not isinstance(callbacks, (list, tuple)):
        callbacks = [callbacks]
    checks.check_monitors(distiller, callbacks)
    # The dataset as given: the checks' stages re-batch it, which tf.data
    # cannot size unread; they keep its batches.
    checks.check_process_steps(dict(arguments, x=given))
    return arguments, list(callbacks)


def _join(joining, teachers, x, given, later):
    """`(x, later)` with the joining teachers' rows, class by class.

    Last in the pipeline: after the user's shuffling, augmentation and
    batching, so a check against the rows sees what the student sees.
    The NumPy inputs' ids and fingerprints stay only where a teacher that
    is not joined reads them in the step.
    """
    keep_ids = any(t.keyed_by_id and not t.joins_rows for t in teachers)
    for kind in dict.fromkeys(type(t) for t in joining):
        group = [t for t in joining if type(t) is kind]
        joined = kind.join_rows(group, x, given, keep_ids, later)
        x, later = joined if later is not None else (joined, None)
    return x, later


def later_passes(distiller, given, arguments, joining):
    """The pipeline of the passes after the first, or None.

    A `tf.data` dataset of known size, read for more than one epoch,
    is checked (`check_data`, a cached teacher's inputs) over its first
    pass only: the same samples, through the same pipeline, need no
    second check, and a per-batch stage of the pipeline costs on a
    small CPU as much as the training step (BENCHMARKS.md). None where
    the checks run every epoch instead: a dataset of unknown or
    infinite size, or with `steps_per_epoch` (a pass is then not an
    epoch), a size that `steps_per_execution` does not divide (the
    last execution of an epoch would read into the next pass), a Keras
    distribution (whose sharding reads the batch size of the
    pipeline's end), and rows that the pipeline joins by epoch
    (a cache of augmented views).
    """
    if (
        not is_dataset(given)
        or arguments.get("steps_per_epoch") is not None
        or arguments.get("epochs", 1) - arguments.get("initial_epoch", 0) < 2
        or keras.distribution.distribution() is not None
        or any(teacher.rows_follow_epoch for teacher in joining)
    ):
        return None
    size = int(given.cardinality())
    if size <= 0 or size % distiller.steps_per_execution:
        return None
    return given


def pipeline_error(distiller, error):
    """The message of a check in the input pipeline that `error` wraps.

    A joining teacher's check runs in the `tf.data` pipeline, whose errors
    reach `fit` wrapped in TensorFlow's; `None` when `error` is no such
    check's.
    """
    for teacher in distiller.teachers:
        if teacher.joins_rows:
            message = teacher.pipeline_error(error)
            if message is not None:
                return message
    return None


def _keep_label_free_weights(arguments):
    # Keras drops the weights of label-free NumPy data.
    batches = label_free_with_weights(
        arguments["x"],
        arguments["sample_weight"],
        arguments.get("batch_size"),
        arguments.get("shuffle", True),
    )
    if batches is None:
        return
    arguments["x"], steps = batches
    arguments.setdefault("steps_per_epoch", steps)
    # The batches are shuffled already; Keras would warn.
    arguments["shuffle"] = False
    for name in ("sample_weight", "batch_size"):
        arguments.pop(name, None)


def _label_free_batches(x, sample_weight, batch_size, shuffle):
    # tf.data, not a generator: it carries the missing label (a
    # NoneTensorSpec), which Keras's generator adapter before 3.12 cannot.
    import tensorflow as tf

    batches = tf.data.Dataset.from_tensor_slices((x, sample_weight))
    if shuffle:
        batches = batches.shuffle(len(sample_weight))
    batches = batches.batch(batch_size).map(lambda x, w: (x, None, w))
    return batches.repeat()


def label_free_with_weights(x, sample_weight, batch_size, shuffle):
    """Batches of label-free NumPy `x` that keep `sample_weight`.

    Keras packs `fit(x, sample_weight=w)` without labels as `(x,)` and
    drops `w`, so a padding mask or per-sample weight would never reach
    the terms. Returns `(dataset, steps_per_epoch)`: a repeated
    `tf.data.Dataset` of `(x, None, w)` batches, shuffled each epoch with
    `shuffle` as Keras shuffles arrays, or `None` when `x` is not NumPy or
    there are no weights.
    """
    leaves = keras.tree.flatten(x)
    if sample_weight is None or not leaves:
        return None
    if not all(isinstance(leaf, np.ndarray) for leaf in leaves):
        return None
    sample_weight = np.asarray(sample_weight)
    sizes = {len(leaf) for leaf in leaves} | {len(sample_weight)}
    if len(sizes) != 1:
        raise ValueError(
            "`sample_weight` must hold one weight per sample of `x`. "
            f"Received: sizes {sorted(sizes)}"
        )
    batch_size = batch_size or 32
    steps = -(-len(sample_weight) // batch_size)
    return _label_free_batches(x, sample_weight, batch_size, shuffle), steps
