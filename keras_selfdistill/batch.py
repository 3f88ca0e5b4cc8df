"""The training batch's layout and its rules, owned here and nowhere else.

A batch's inputs may carry, beside the models' own inputs, keys that the
library adds and reads:

- `"sample_id"` (`SAMPLE_ID`): the example's stable id, which teachers
  with per-sample state key their rows by (never the batch position);
- `"sample_fingerprint"` (`FINGERPRINT`): a hash of the example's inputs,
  taken before augmentation, which shows when an id later names another
  example;
- `"teacher_outputs"` (`TEACHER_OUTPUTS`): rows of cached teachers that
  `fit` joined to the batch, by teacher name;
- `"inputs"` (`INPUTS`): the models' inputs when they are not a dict.

`select_input` gives a model its own inputs back. The id rule (ids lie in
`[0, num_samples)` and, where a teacher writes a row per id, are unique
within a batch) has one message, checked on NumPy arrays
(`check_ids`), in a `tf.data` pipeline (`ids_assertion`) and in the
training step (`checked_ids`).
"""

import sys

import keras
import numpy as np

from keras_selfdistill import _internals

SAMPLE_ID = "sample_id"
FINGERPRINT = "sample_fingerprint"
INPUTS = "inputs"
TEACHER_OUTPUTS = "teacher_outputs"
# The keys no model reads.
LAYOUT_KEYS = (SAMPLE_ID, FINGERPRINT, TEACHER_OUTPUTS)


def is_dataset(value):
    """Whether `value` is a `tf.data.Dataset`, without importing TensorFlow.

    A dataset exists only where TensorFlow was imported: on JAX the
    library imports, and trains on NumPy data, without it.
    """
    tf = sys.modules.get("tensorflow")
    data = getattr(tf, "data", None)
    return data is not None and isinstance(value, data.Dataset)


def select_input(x, input_key, owner):
    """Returns a model's own inputs from the batch inputs `x`.

    `x[input_key]` when `input_key` is set, otherwise `x` itself, in both
    cases without the sample ids and fingerprints that
    `keras_selfdistill.data.with_sample_ids` adds (`{"inputs": x,
    "sample_id": ids, "sample_fingerprint": f}` gives `x`), and without
    the cached teachers' rows that `fit` joins (NumPy inputs lose their ids
    once joined).
    """
    if isinstance(x, dict) and (SAMPLE_ID in x or TEACHER_OUTPUTS in x):
        x = {key: value for key, value in x.items() if key not in LAYOUT_KEYS}
        if input_key is None and set(x) == {INPUTS}:
            return x[INPUTS]
    if input_key is None:
        return x
    if not isinstance(x, dict) or input_key not in x:
        keys = sorted(x) if isinstance(x, dict) else None
        raise ValueError(
            f"{owner} reads the input under key '{input_key}', but the batch "
            f"inputs {'have keys ' + str(keys) if keys else 'are not a dict'}"
            ". Give each model its own key in the inputs, e.g. "
            "`x = {'student': ..., 'teacher': ...}`, or set the right "
            f"`input_key`. Received: input_key={input_key!r}"
        )
    return x[input_key]


def with_layout(x, sample_id, sample_fingerprint):
    """`x` with its ids and fingerprints, as `with_sample_ids` lays them."""
    if isinstance(x, dict):
        for key in (SAMPLE_ID, FINGERPRINT):
            if key in x:
                raise ValueError(
                    f"The inputs already hold a '{key}' key. Add sample ids "
                    f"once. Received: keys {sorted(x)}"
                )
        return {**x, SAMPLE_ID: sample_id, FINGERPRINT: sample_fingerprint}
    return {INPUTS: x, SAMPLE_ID: sample_id, FINGERPRINT: sample_fingerprint}


# The id rule.


def ids_message(num_samples, unique=True):
    """What a sample id must be, for an error that names the bad ids."""
    message = f"Sample ids must lie in [0, num_samples={num_samples})"
    if not unique:
        return message + "."
    return (
        f"{message} and be unique within a batch (a repeated id would make "
        "two predictions race for one bank row; add ids with "
        "`with_sample_ids` before `repeat` or oversampling)."
    )


def check_ids(ids, num_samples, unique=True):
    """Raises the rule's `ValueError` for NumPy ids that break it."""
    ids = np.asarray(ids).reshape(-1)
    if not ids.size:
        return
    if ids.min() < 0 or ids.max() >= num_samples:
        raise ValueError(
            f"{ids_message(num_samples, unique)} Received: ids from "
            f"{ids.min()} to {ids.max()}"
        )
    if unique:
        values, counts = np.unique(ids, return_counts=True)
        if len(values) != ids.size:
            raise ValueError(
                f"{ids_message(num_samples)} Received: ids repeated, e.g. "
                f"{values[counts > 1][:5]}"
            )


def ids_assertion(ids, num_samples, unique=True):
    """The rule as a TensorFlow assertion on a tensor of ids.

    One assertion for the three cases keeps the cost to a few small ops;
    it raises `tf.errors.InvalidArgumentError` with the rule's message.
    """
    import tensorflow as tf

    ids = tf.reshape(tf.cast(ids, "int64"), (-1,))
    valid = (tf.reduce_min(ids) >= 0) & (tf.reduce_max(ids) < num_samples)
    if unique:
        distinct, _ = tf.unique(ids)
        valid = valid & tf.equal(tf.size(distinct), tf.size(ids))
    return tf.debugging.Assert(
        valid,
        [ids_message(num_samples, unique), "Received ids:", ids],
        summarize=16,
    )


def checked_ids(ids, num_samples, unique=True):
    """`ids`, checked against the rule inside the training step.

    TensorFlow asserts in the graph. Compiled JAX code cannot raise: there
    `fit` checks ids in the input pipeline, and only concrete ids (an
    eager call) are checked here.
    """
    if keras.backend.backend() != "tensorflow":
        if not _internals.is_jax_tracer(ids):
            check_ids(ids, num_samples, unique)
        return ids
    import tensorflow as tf

    with tf.control_dependencies([ids_assertion(ids, num_samples, unique)]):
        return tf.identity(ids)


# Fingerprints.


def fingerprint(x):
    """A nonzero int32 hash of one example's inputs (a nested structure).

    Stored beside each bank row, it shows when a sample id later names
    another example: ids attached after a reshuffling `shuffle`, arrays
    re-sliced between `fit` calls, a tfds split read with shuffled files.
    """
    import tensorflow as tf

    parts = [tf.io.serialize_tensor(leaf) for leaf in tf.nest.flatten(x)]
    joined = tf.strings.reduce_join(tf.stack(parts), separator="|")
    bucket = tf.strings.to_hash_bucket_fast(joined, 2**31 - 2)
    # 0 marks "no fingerprint" in the bank.
    return tf.cast(bucket + 1, "int32")


def fingerprints_of(inputs, batched):
    """The fingerprint of each example of a batch (or of one example).

    Graph-compatible, for `tf.data` maps; NumPy arrays of a whole dataset
    go through `array_fingerprints` instead.
    """
    import tensorflow as tf

    if not batched:
        return fingerprint(inputs)
    return tf.map_fn(fingerprint, inputs, fn_output_signature=tf.int32)


# Rows hashed at once by `array_fingerprints`: bounds the bytes copied.
_HASH_ROWS = 8192


def array_fingerprints(x, size):
    """`fingerprint` of every example of NumPy inputs, as an int32 array.

    The serialized example is the same bytes for every row but the row's
    own: `serialize_tensor` writes a header fixed by dtype and shape, then
    the raw little-endian content. The rows' strings are assembled in
    NumPy and hashed in one op per chunk, 22–27× faster than one
    `tf.data` element per example (`benchmarks/fingerprints.py`); inputs
    whose serialization is not that (checked on the first and last
    example: strings, big-endian arrays) take the per-example path.
    """
    import tensorflow as tf

    leaves = [np.asarray(leaf) for leaf in tf.nest.flatten(x)]
    if size == 0:
        return np.zeros(0, "int32")
    headers = serialized_headers(leaves, size)
    if headers is None:
        rows = tf.data.Dataset.from_tensor_slices(x).map(
            fingerprint, num_parallel_calls=tf.data.AUTOTUNE
        )
        return np.concatenate([b.numpy() for b in rows.batch(_HASH_ROWS)])
    values = []
    for start in range(0, size, _HASH_ROWS):
        stop = min(start + _HASH_ROWS, size)
        parts = []
        for index, (header, leaf) in enumerate(zip(headers, leaves)):
            if index:
                parts.append(np.full((stop - start, 1), ord("|"), np.uint8))
            parts.append(np.broadcast_to(header, (stop - start, header.size)))
            content = np.ascontiguousarray(leaf[start:stop])
            parts.append(content.view(np.uint8).reshape(stop - start, -1))
        joined = np.concatenate(parts, axis=1)
        strings = tf.constant([row.tobytes() for row in joined])
        bucket = tf.strings.to_hash_bucket_fast(strings, 2**31 - 2)
        values.append((bucket.numpy() + 1).astype("int32"))
    return np.concatenate(values)


def serialized_headers(leaves, size):
    """Each leaf's serialization header, or None where the bytes differ."""
    import tensorflow as tf

    headers = []
    for leaf in leaves:
        if leaf.dtype.kind not in "biuf" or leaf.dtype.byteorder == ">":
            return None
        header = None
        for row in (leaf[0], leaf[size - 1]):
            serialized = tf.io.serialize_tensor(row).numpy()
            content = np.ascontiguousarray(row).tobytes()
            if not serialized.endswith(content):
                return None
            start = serialized[: len(serialized) - len(content)]
            if header is not None and start != header:
                return None
            header = start
        headers.append(np.frombuffer(header, np.uint8))
    return headers
