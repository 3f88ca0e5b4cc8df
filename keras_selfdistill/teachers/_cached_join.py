"""How `fit` joins cached teachers' rows to the training data.

`Cached.join_rows` and `Cached.pipeline_error`: NumPy inputs gain the rows
once; a `tf.data` dataset gains a last `map` that checks each batch's
inputs against the cache on their first visit and, for caches the step
does not gather itself, reads the rows. `_joined` is 124 lines: one
`tf.data` map, whose stage for each teacher is a closure of the map.
"""

import re

from keras_selfdistill import _cache_files as cache
from keras_selfdistill.batch import FINGERPRINT
from keras_selfdistill.batch import SAMPLE_ID
from keras_selfdistill.batch import TEACHER_OUTPUTS
from keras_selfdistill.batch import array_fingerprints
from keras_selfdistill.batch import fingerprints_of
from keras_selfdistill.batch import is_dataset
from keras_selfdistill.batch import select_input


def join(teachers, x, given=None, keep_ids=True, later=None):
    """`x` with the rows of each cached teacher, for `fit`'s training data.

    NumPy inputs with sample ids gain the rows directly, and lose the ids
    and fingerprints unless `keep_ids` (another teacher reads them in the
    step): fewer arrays for Keras to slice each batch. A `tf.data`
    dataset keeps its ids, which the step reads the rows of from an
    in-memory cache (`Cached.step_table`); for the other caches it gains
    a final `map` that reads them for each batch. Each sample's inputs are
    checked against the cache on its first visit in the `fit`. `given` is
    the object the user passed to `fit` (which `x` may wrap): the checks
    of its samples are remembered across `fit` calls.

    `later`, for a dataset `x` that `fit` reads once and then continues
    with another pipeline (`later`, the same samples without the input
    checks, repeated): every batch of `x` is checked and none of `later`,
    and the result is the pair of them joined.
    """

    names = [teacher.name for teacher in teachers]
    if len(set(names)) < len(names):
        raise ValueError(
            "Cached teachers are joined to the batch by name, and two have "
            f"the same one. Give each its own `name`. Received: {names}"
        )

    viewed = [teacher for teacher in teachers if teacher.views]
    if viewed and len(teachers) > 1:
        raise ValueError(
            "A cached teacher with augmented views sets the inputs the "
            "student sees, so it must be the only cached teacher: another "
            "cache's targets would be for other inputs. Received: cached "
            f"teachers {names}, with views {[t.name for t in viewed]}"
        )

    if is_dataset(x):
        spec = x.element_spec
        x_spec = spec[0] if isinstance(spec, tuple) else spec
        if not isinstance(x_spec, dict) or SAMPLE_ID not in x_spec:
            raise ValueError(_NO_IDS.format(spec=spec))
        key = x if given is None else given
        checks = {teacher.name: teacher._start(key) for teacher in teachers}
        if later is None:
            return _joined(teachers, x, checks, "first visit")
        return (
            _joined(teachers, x, checks, "every batch"),
            _joined(teachers, later, checks, "never"),
        )
    if not isinstance(x, dict) or SAMPLE_ID not in x:
        raise ValueError(_NO_IDS.format(spec=type(x).__name__))
    if viewed:
        raise ValueError(
            f"Cached teacher '{viewed[0].name}' holds augmented views, which "
            "the input pipeline augments anew every epoch: pass the "
            "training data as a `tf.data.Dataset` "
            "(`tf.data.Dataset.from_tensor_slices((x, y))` after "
            "`with_sample_ids`, then shuffle and batch). Received: NumPy "
            "inputs"
        )
    inputs = select_input(x, None, "Cached teacher")
    size = len(x[SAMPLE_ID])
    prints = array_fingerprints(inputs, size)
    outputs = {
        teacher.name: teacher.rows(x[SAMPLE_ID], prints) for teacher in teachers
    }
    if not keep_ids:
        x = {k: v for k, v in x.items() if k not in (SAMPLE_ID, FINGERPRINT)}
    return dict(x, **{TEACHER_OUTPUTS: outputs})


def _joined(teachers, x, checks, check):
    """The dataset `x` joined to `teachers`' rows, checked as `check` says.

    `check` is `"first visit"` (hash a batch while any of its ids is
    unchecked in this `fit`), `"every batch"` or `"never"`; `checks` says
    which teachers check at all in this `fit`. Returns `x` itself when no
    teacher has anything to do in the pipeline.
    """
    import tensorflow as tf

    spec = x.element_spec
    x_spec = spec[0] if isinstance(spec, tuple) else spec
    batched = x_spec[SAMPLE_ID].shape.rank == 1
    active = [
        teacher
        for teacher in teachers
        if teacher.step_table() is None
        or (checks[teacher.name] and check != "never")
    ]
    if not active:
        return x
    # Made here, eagerly: the map function captures them.
    in_memory = {
        teacher.name: teacher._tensors()
        for teacher in active
        if teacher.step_table() is None
    }
    viewed = [teacher for teacher in active if teacher.views]
    epoch = viewed[0]._epoch_variable() if viewed else None

    def add(*element):
        features = element[0]
        ids = tf.reshape(features[SAMPLE_ID], [-1])
        outputs = {}
        inputs = features
        for teacher in active:
            specs = cache.array_specs(teacher.manifest)
            names = cache.ARRAYS[teacher.kind]
            dtypes = [tf.as_dtype(specs[n][1]) for n in names]
            tensors = in_memory.get(teacher.name)

            def prints(features=features):
                inputs = select_input(features, None, "Cached teacher")
                return tf.reshape(fingerprints_of(inputs, batched), [-1])

            def when_unchecked(hashed, unhashed, teacher=teacher):
                if not checks[teacher.name] or check == "never":
                    return unhashed()
                if check == "every batch":
                    return hashed()
                # Hashed only while some id of the batch is unchecked: in
                # the first epoch of the fit.
                unchecked = tf.numpy_function(
                    teacher.unverified, [ids], tf.bool, stateful=False
                )
                return tf.cond(tf.reshape(unchecked, []), hashed, unhashed)

            if teacher.step_table() is not None:
                # The step gathers the rows; only the check runs here, and
                # the ids the step reads pass through it.
                given = inputs[SAMPLE_ID]
                checked_ids = when_unchecked(
                    lambda teacher=teacher, given=given: tf.numpy_function(
                        teacher.verify,
                        [given, prints()],
                        given.dtype,
                        stateful=False,
                    ),
                    lambda given=given: given,
                )
                inputs = dict(
                    inputs,
                    **{SAMPLE_ID: tf.ensure_shape(checked_ids, given.shape)},
                )
                continue

            def read(teacher=teacher, tensors=tensors, dtypes=dtypes):
                if tensors is not None:
                    return [tf.gather(t, ids) for t in tensors]
                return tf.numpy_function(
                    teacher.rows,
                    [ids, tf.zeros_like(ids, tf.int32), False],
                    dtypes,
                    stateful=False,
                )

            def checked(teacher=teacher, dtypes=dtypes):
                return tf.numpy_function(
                    teacher.rows,
                    [ids, prints(), True],
                    dtypes,
                    stateful=False,
                )

            values = when_unchecked(checked, read)
            values = [
                tf.ensure_shape(v, [None] + list(specs[n][0]))
                for v, n in zip(values, names)
            ]
            if teacher.views:
                # View (id + epoch) mod views of each sample: its
                # target, and its inputs augmented as the writer did.
                view = (tf.cast(ids, "int64") + epoch) % teacher.views
                values = [
                    tf.gather(v, view, axis=1, batch_dims=1) for v in values
                ]
                inputs = cache.view_inputs(
                    features,
                    teacher.augment,
                    teacher.manifest["seed"],
                    teacher.views,
                    view if batched else view[0],
                    batched,
                )
            outputs[teacher.name] = tuple(
                v if batched else v[0] for v in values
            )
        if outputs:
            inputs = dict(inputs, **{TEACHER_OUTPUTS: outputs})
        return (inputs,) + element[1:]

    return x.map(add, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
        tf.data.AUTOTUNE
    )


def cached_error(error):
    """The check's own message when `error` wraps a cached teacher's."""
    match = _CHECK.search(str(error))
    return None if match is None else match.group(1)


MESSAGE_START = "Cached teacher '"
_CHECK = re.compile(
    "(" + re.escape(MESSAGE_START) + r"[^\n]*?written \[[^\]]*\])"
)

_NO_IDS = (
    "A cached teacher reads its outputs by sample id: attach ids with "
    "`keras_selfdistill.data.with_sample_ids` to the training inputs. "
    "Received: {spec}"
)
