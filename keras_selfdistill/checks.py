"""Checks on the training data, made before or beside the compiled step.

A check inside the compiled step costs every step and vanishes under XLA
and JAX (neither can raise from compiled code). So `Distiller.fit` checks
NumPy data once before training and checks each `tf.data` batch in the
input pipeline, where it runs on the host, overlapped with training, and
raises `tf.errors.InvalidArgumentError` with the message below on every
backend and with `jit_compile=True`. A dataset of known size read for
several epochs is checked over its first pass (`Distiller.fit`).
"""

import types

import keras
import numpy as np

from keras_selfdistill import _internals
from keras_selfdistill import batch
from keras_selfdistill.batch import SAMPLE_ID
from keras_selfdistill.batch import select_input
from keras_selfdistill.teachers import teacher


def label_range_message(num_classes):
    return (
        f"Labels must be class indices in [0, {num_classes}) for a student "
        f"with {num_classes} outputs. Check the label encoding, or give the "
        "student as many outputs as there are classes."
    )


NON_FINITE_MESSAGE = (
    "The inputs hold NaN or infinite values, which would make every loss "
    "and weight NaN. Clean or impute the data (e.g. `np.nan_to_num`) first."
)


def _sparse_labels(shape, num_classes):
    """Whether labels of `shape` (batch axis included) are class indices."""
    if num_classes is None or num_classes == 1 or shape is None:
        return False
    return len(shape) == 1 or (len(shape) == 2 and shape[-1] == 1)


def _split(element):
    if isinstance(element, tuple) and 1 <= len(element) <= 3:
        return element[0], (element[1] if len(element) > 1 else None)
    return element, None


def ignored_label(loss):
    """The label a sparse loss skips (`ignore_class`), or `None`.

    Semi-supervised batches mark unlabelled samples with it (e.g. -1 with
    `SparseCategoricalCrossentropy(ignore_class=-1)`); the checks let it
    through.
    """
    return getattr(loss, "ignore_class", None)


def check_arrays(x, y, num_classes, num_samples, ignored=None, unique_ids=True):
    """Checks NumPy training data once, before the first step.

    Sample ids must lie in `[0, num_samples)`, and, with `unique_ids` (a
    teacher writes a row per id), appear once.
    """
    for leaf in keras.tree.flatten(x):
        if isinstance(leaf, np.ndarray) and leaf.shape[:1] == (0,):
            raise ValueError(
                "The training inputs hold no samples, so `fit` would run no "
                f"step. Received: x with shape {leaf.shape}"
            )
    for leaf in keras.tree.flatten(x):
        if (
            isinstance(leaf, np.ndarray)
            and np.issubdtype(leaf.dtype, np.floating)
            and not np.isfinite(leaf).all()
        ):
            bad = int(np.size(leaf) - np.isfinite(leaf).sum())
            raise ValueError(
                f"{NON_FINITE_MESSAGE} Received: {bad} non-finite values in "
                f"inputs of shape {leaf.shape}"
            )
    if num_samples is not None and isinstance(x, dict) and SAMPLE_ID in x:
        batch.check_ids(x[SAMPLE_ID], num_samples, unique_ids)
    if not isinstance(y, np.ndarray) or y.size == 0:
        return
    if not _sparse_labels(y.shape, num_classes):
        return
    if np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all():
        raise ValueError(
            f"{label_range_message(num_classes)} Received: NaN labels"
        )
    labelled = y if ignored is None else y[y != ignored]
    if not labelled.size:
        return
    low, high = labelled.min(), labelled.max()
    if low < 0 or high >= num_classes or not np.all(np.mod(labelled, 1) == 0):
        raise ValueError(
            f"{label_range_message(num_classes)} Received: labels from "
            f"{low} to {high}"
        )


def _is_sparse_loss(loss):
    return isinstance(loss, keras.losses.SparseCategoricalCrossentropy) or (
        loss
        in (
            "sparse_categorical_crossentropy",
            keras.losses.sparse_categorical_crossentropy,
        )
    )


def check_label_encoding(label_shape, num_classes, loss):
    """Fails on one-hot labels given to a sparse (class-index) loss.

    `label_shape` is the labels' shape, batch axis included, or `None`.
    """
    if (
        label_shape is None
        or num_classes is None
        or num_classes == 1
        or len(label_shape) != 2
        or label_shape[-1] != num_classes
        or not _is_sparse_loss(loss)
    ):
        return
    raise ValueError(
        "The labels look one-hot (shape "
        f"{tuple(label_shape)}, one column per class) but the loss is "
        "SparseCategoricalCrossentropy, which takes class indices. Compile "
        "with `keras.losses.CategoricalCrossentropy` or pass "
        "`np.argmax(y, axis=-1)`. Received: labels of shape "
        f"{tuple(label_shape)}"
    )


def check_batched(dataset, input_shape, select):
    """Fails on a dataset whose elements lack the student's batch axis.

    `input_shape` is the student's (batch axis included) or `None`;
    `select` picks the student's part of the inputs.
    """
    import tensorflow as tf

    x_spec = select(_split(dataset.element_spec)[0])
    if (
        input_shape is None
        or not isinstance(x_spec, tf.TensorSpec)
        or x_spec.shape.rank is None
        or x_spec.shape.rank != len(input_shape) - 1
        or tuple(x_spec.shape) != tuple(input_shape[1:])
    ):
        return
    raise ValueError(
        "The dataset looks unbatched: its elements have shape "
        f"{tuple(x_spec.shape)}, one sample of the student's input "
        f"{tuple(input_shape)}. Batch it, e.g. `dataset.batch(32)`. "
        f"Received: element_spec={dataset.element_spec}"
    )


def check_dataset(
    dataset, num_classes, num_samples, ignored=None, unique_ids=True
):
    """`dataset` with each batch checked in the input pipeline.

    Returns `dataset` unchanged when nothing in it can be checked.
    """
    import tensorflow as tf

    x_spec, y_spec = _split(dataset.element_spec)
    check_labels = (
        isinstance(y_spec, tf.TensorSpec)
        and y_spec.shape.rank is not None
        and _sparse_labels(tuple(y_spec.shape), num_classes)
    )
    float_inputs = any(
        isinstance(spec, tf.TensorSpec) and spec.dtype.is_floating
        for spec in tf.nest.flatten(x_spec)
    )
    check_ids = (
        num_samples is not None
        and isinstance(x_spec, dict)
        and SAMPLE_ID in x_spec
    )
    if not (check_labels or float_inputs or check_ids):
        return dataset

    def check(*element):
        element = element[0] if len(element) == 1 else element
        x, y = _split(element)
        checks = []
        for leaf in tf.nest.flatten(x):
            if isinstance(leaf, tf.Tensor) and leaf.dtype.is_floating:
                checks.append(
                    tf.debugging.Assert(
                        tf.reduce_all(tf.math.is_finite(leaf)),
                        [NON_FINITE_MESSAGE],
                    )
                )
        if check_labels:
            labels = tf.cast(y, "float64")
            valid = (
                (labels >= 0)
                & (labels < num_classes)
                & tf.equal(labels, tf.round(labels))
            )
            if ignored is not None:
                valid = valid | tf.equal(labels, float(ignored))
            valid = tf.reduce_all(valid)
            checks.append(
                tf.debugging.Assert(
                    valid,
                    [
                        label_range_message(num_classes),
                        "Received labels:",
                        y,
                    ],
                    summarize=16,
                )
            )
        if check_ids:
            checks.append(
                batch.ids_assertion(x[SAMPLE_ID], num_samples, unique_ids)
            )
        with tf.control_dependencies(checks):
            return tf.nest.map_structure(tf.identity, element)

    checked = dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE)
    if keras.distribution.distribution() is not None:
        # Keras shards a dataset across processes by its batch size, which
        # tf.data reads from the last `batch` and not through a `map`:
        # batching again to the same size states it.
        batch_size = _internals.dataset_batch_size(dataset)
        if batch_size > 0:
            checked = checked.unbatch().batch(batch_size)
            node = _last_batching(dataset)
            if node is not None and int(node._batch_size) == batch_size:
                # Every batch full but the last: as many batches as
                # given. Said, so that Keras knows the epoch's steps (it
                # would warn at the first epoch's end that the input "ran
                # out of data").
                checked = checked.apply(
                    tf.data.experimental.assert_cardinality(
                        dataset.cardinality()
                    )
                )
    return checked


def _checked_batches(generator, num_classes, num_samples, loss, unique_ids):
    """Yields the generator's batches, each checked like NumPy data."""
    for element in generator:
        x, y = _split(element)
        check_label_encoding(getattr(y, "shape", None), num_classes, loss)
        check_arrays(
            x,
            y if isinstance(y, np.ndarray) else None,
            num_classes,
            num_samples,
            ignored_label(loss),
            unique_ids,
        )
        yield element


def _probability_rows(outputs):
    if not hasattr(outputs, "shape"):
        return False
    outputs = np.asarray(_internals.to_numpy(outputs))
    if outputs.ndim < 2 or outputs.shape[-1] <= 1 or outputs.size == 0:
        return False
    # A softmax makes every row a distribution: the first rows tell (a
    # sequence model's whole output in float64 would be twice its logits).
    rows = outputs.reshape(-1, outputs.shape[-1])[:64].astype("float64")
    return bool((rows >= 0).all()) and bool(
        np.allclose(rows.sum(axis=-1), 1.0, atol=1e-3)
    )


def check_logits(distiller, x):
    """Fails when the student or a frozen teacher returns probabilities.

    Runs them once, in inference mode, on the first sample of the first
    batch `x`: rows that are all non-negative and sum to 1 are
    probabilities, whatever layer made them (a final activation is caught
    earlier, at construction). One sample, not the batch: a language
    model's `[length, vocabulary]` logits of one sequence are what the
    check needs, and a batch of them can be more than the training step
    holds (a fused loss never builds them).
    """
    x = keras.tree.map_structure(
        lambda value: value[:1] if len(getattr(value, "shape", ())) else value,
        x,
    )
    student_x = select_input(x, distiller.input_key, "The student")
    if _probability_rows(distiller.student(student_x, training=False)):
        teacher.refuse_probabilities(
            "student", distiller.student.name, "softmax"
        )
    for frozen in distiller.teachers:
        if frozen.returns_model_outputs:
            if _probability_rows(frozen.targets(x, None, 1.0)):
                teacher.refuse_probabilities(
                    "teacher", frozen.model.name, "softmax"
                )


def _first_batch(x):
    if batch.is_dataset(x):
        element = next(iter(x.take(1)), None)
        return None if element is None else _split(element)[0]
    leaves = keras.tree.flatten(x)
    if not leaves or not all(isinstance(v, np.ndarray) for v in leaves):
        return None
    return keras.tree.map_structure(lambda value: value[:32], x)


def _input_shape(model):
    try:
        shape = model.input_shape
    except (AttributeError, ValueError, RuntimeError):
        return None
    return shape if isinstance(shape, tuple) else None


def check_fit_data(x, y, distiller, num_samples, unique_ids=True):
    """Checks what can be checked at no step cost; returns the inputs.

    An empty or unbatched dataset fails here; NumPy data is checked once,
    the batches of a Python generator as they are drawn, and `tf.data`
    batches in the input pipeline (see `keras_selfdistill.checks`).
    """
    classes = teacher.num_classes(distiller.student)
    if x is None:
        return x
    first = _first_batch(x) if distiller.check_data else None
    if first is not None:
        for term in distiller.terms:
            term.check_batch(first)
        # A term that computes the output layer itself found the student's
        # head (and a teacher model's) linear when it was built; running
        # the models whole would build the logits the term avoids.
        if (
            distiller.terms
            and all(t.reads_logits for t in distiller.terms)
            and not any(t.computes_output for t in distiller.terms)
        ):
            check_logits(distiller, first)
    if isinstance(x, types.GeneratorType):
        if not distiller.check_data:
            return x
        return _checked_batches(
            x, classes, num_samples, distiller.loss, unique_ids
        )
    if batch.is_dataset(x):
        if int(x.cardinality()) == 0:
            raise ValueError(
                "The training dataset is empty (cardinality 0), so `fit` "
                "would run no step. Check filters, `take`/`skip` and the "
                "batch size with `drop_remainder=True`. "
                f"Received: x={x}"
            )
        spec = x.element_spec
        labels = spec[1] if isinstance(spec, tuple) and len(spec) > 1 else None
        shape = getattr(labels, "shape", None)
        check_label_encoding(
            None if shape is None or shape.rank is None else tuple(shape),
            classes,
            distiller.loss,
        )
        check_batched(
            x,
            _input_shape(distiller.student),
            lambda spec: select_input(spec, distiller.input_key, "The student"),
        )
        if not distiller.check_data:
            return x
        return check_dataset(
            x,
            classes,
            num_samples,
            ignored_label(distiller.loss),
            unique_ids,
        )
    check_label_encoding(getattr(y, "shape", None), classes, distiller.loss)
    if distiller.check_data:
        check_arrays(
            x,
            y,
            classes,
            num_samples,
            ignored_label(distiller.loss),
            unique_ids,
        )
    return x


def check_monitors(distiller, callbacks):
    """Refuses a callback that monitors a loss against a moving target.

    A self-teacher's term (past predictions, EMA, snapshots, the
    student's own weak view in `Consistency`) starts at 0, when the
    teacher is the student, and grows as the two drift
    apart: `EarlyStopping` on it stops a healthy run within epochs.
    """
    moving = {
        name
        for name, term in zip(
            distiller._term_metric_names, distiller._loss_terms
        )
        if term.follows_student
    }
    for callback in callbacks:
        monitor = getattr(callback, "monitor", None)
        if monitor in moving:
            raise ValueError(
                f"{type(callback).__name__} monitors '{monitor}', the "
                "loss against a teacher that follows the student (its "
                "past predictions, moving average, snapshots or own weak "
                "view): it "
                "starts at 0 and grows as training moves the student, so "
                "it does not measure progress. Monitor the student on "
                "held-out data instead, e.g. `monitor='val_loss'` or "
                f"'val_accuracy'. Received: monitor={monitor!r}"
            )


def check_process_steps(arguments):
    """Refuses a multi-process JAX `fit` whose processes would run
    different numbers of steps.

    Under a Keras distribution over several processes each process reads
    its own shard of the global `tf.data` dataset (`distribute_dataset`:
    every batch split into per-process batches, then every n-th of
    them). A last, partial global batch gives the first processes one
    batch more than the others; a process with a step more than the
    others would wait forever in that step's all-reduce, and the others
    in the next collective. Every process works the shards' sizes out
    from the global dataset (the same on each, as Keras requires), with
    no collective and without reading it, and raises, naming them, where
    the steps the processes would run differ. A dataset whose last
    batch's size cannot be known without reading it (a `filter`, a
    generator, a `repeat` after the batch) is not checked.
    """
    if keras.backend.backend() != "jax":
        return
    distribution = keras.distribution.distribution()
    if distribution is None:
        return
    import jax

    processes = jax.process_count()
    if processes < 2 or not getattr(distribution, "auto_shard_dataset", True):
        return
    # As `Distribution.distribute_tf_dataset` shards: across processes,
    # or across model replicas where a replica spans several processes
    # (those read one shard); one replica reads the whole dataset.
    replicas = getattr(distribution, "num_model_replicas", processes)
    if replicas < 2:
        return
    shards = min(replicas, processes)
    reader = "process" if shards == processes else "shard"
    epochs = arguments.get("epochs", 1) - arguments.get("initial_epoch", 0)
    validation = arguments.get("validation_data")
    plans = [("training", arguments.get("x"), "steps_per_epoch")]
    if batch.is_dataset(validation):
        plans.append(("validation", validation, "validation_steps"))
    for what, data, given in plans:
        sizes = shard_sizes(data, shards)
        if sizes is None:
            continue
        steps = arguments.get(given)
        if steps is not None and what == "training":
            # Keras reads one iterator across epochs when the steps are
            # given: a shard runs out once, over the whole fit.
            steps = int(steps) * max(epochs, 1)
        ran = {size if steps is None else min(size, steps) for size in sizes}
        if len(ran) > 1:
            counts = ", ".join(
                f"{reader} {i}: {n}" for i, n in enumerate(sizes)
            )
            raise ValueError(
                f"The {processes} processes would run different numbers "
                f"of {what} steps: a process with more would wait forever "
                "for the others in its step's all-reduce. Their shards of "
                "the dataset hold different numbers of batches because "
                "the last global batch is partial. Batch with "
                "`drop_remainder=True`, or give every process the same "
                f"steps (`{given}` no larger than the smallest shard). "
                f"Received: batches per shard ({counts})"
            )


# The batching datasets whose last batch `shard_sizes` can size.
_BATCHING = ("_BatchDataset", "_ParallelBatchDataset", "_PaddedBatchDataset")


def _last_batching(dataset):
    """The last `batch` of a `tf.data` pipeline, where every stage after
    it keeps one element per element and the size is known; else None."""
    if not batch.is_dataset(dataset):
        return None
    batches = int(dataset.cardinality())
    node = dataset
    while node is not None and type(node).__name__ not in _BATCHING:
        node = getattr(node, "_input_dataset", None)
    if batches <= 0 or node is None or int(node.cardinality()) != batches:
        return None
    return node


def shard_sizes(dataset, processes):
    """Each shard's batches of a batched `tf.data` dataset, or None.

    As `keras.distribution.DataParallel.distribute_dataset` shards it
    `processes` ways: every global batch of `b` rows split into batches
    of `b / processes`, shard `i` reading batches `i, i + processes,
    ...`. Worked out from
    the sizes tf.data knows without reading the data: the number of
    batches, and the rows fed to the last `batch` when every stage after
    it keeps one element per element. None where those are not known.
    """
    node = _last_batching(dataset)
    if node is None:
        return None
    batches = int(dataset.cardinality())
    rows = int(node._batch_size)
    if rows % processes:
        # Keras refuses a global batch that processes do not divide.
        return None
    if bool(node._drop_remainder):
        last = rows
    else:
        fed = int(node._input_dataset.cardinality())
        if fed < 0:
            return None
        last = fed - (batches - 1) * rows
    per_process = rows // processes
    split = (batches - 1) * processes + -(-last // per_process)
    return [len(range(i, split, processes)) for i in range(processes)]
