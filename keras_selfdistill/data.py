"""Sample ids for teachers that keep per-sample state."""

import numpy as np

from keras_selfdistill.batch import FINGERPRINT  # noqa: F401 (public)
from keras_selfdistill.batch import INPUTS  # noqa: F401 (public)
from keras_selfdistill.batch import SAMPLE_ID  # noqa: F401 (public)
from keras_selfdistill.batch import array_fingerprints
from keras_selfdistill.batch import fingerprint
from keras_selfdistill.batch import with_layout

TFDS_ID = "tfds_id"


def _shard_offsets(info, split):
    splits = getattr(info, "splits", None)
    if splits is None or not isinstance(split, str):
        raise TypeError(
            "Elements with a 'tfds_id' need the dataset's `info` (the "
            "`tfds.core.DatasetInfo` from `tfds.load(..., with_info=True)`) "
            "and the `split` name, to turn each record's file and index "
            f"into one id. Received: info={info!r}, split={split!r}"
        )
    base = split.split("[")[0]
    if base not in splits:
        raise ValueError(
            f"Unknown split {base!r}; the dataset has {sorted(splits)}. "
            f"Received: split={split!r}"
        )
    lengths = [int(n) for n in splits[base].shard_lengths]
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype("int64")


def _tfds_ids(dataset, info, split):
    import tensorflow as tf

    offsets = tf.constant(_shard_offsets(info, split))
    supervised = getattr(info, "supervised_keys", None)

    def attach(element):
        tfds_id = element[TFDS_ID]
        shard = tf.strings.to_number(
            tf.strings.regex_replace(tfds_id, r".*-(\d+)-of-\d+__.*", r"\1"),
            tf.int64,
        )
        index = tf.strings.to_number(
            tf.strings.regex_replace(tfds_id, r".*__(\d+)$", r"\1"), tf.int64
        )
        sample_id = tf.gather(offsets, shard) + index
        features = {k: v for k, v in element.items() if k != TFDS_ID}
        if supervised is None:
            return with_layout(features, sample_id, fingerprint(features))
        x_key, y_key = supervised[0], supervised[1]
        x = features[x_key]
        return with_layout(x, sample_id, fingerprint(x)), features[y_key]

    return dataset.map(attach, num_parallel_calls=tf.data.AUTOTUNE)


def with_sample_ids(data, info=None, split=None):
    """Attaches a stable sample id (and a fingerprint) to every example.

    Teachers that keep per-sample state (`keras_selfdistill.teachers.
    PastPredictions`) key it by this id, never by batch position, so
    shuffling and augmentation cannot misalign it. The inputs become
    `{"inputs": x, "sample_id": id, "sample_fingerprint": f}` (or gain the
    two keys when they are already a dict); the `Distiller` and its
    teachers strip them before calling their models, and `predict` accepts
    plain inputs. The fingerprint, a hash of the example's inputs taken
    here, before any augmentation, is stored beside each bank row: an id
    that later names another example is an error at the end of the epoch,
    never a target from the wrong example.

    Where the id comes from:

    - NumPy inputs: the row index; Keras's `shuffle=True` permutes ids with
      the rows.
    - A `tf.data.Dataset` of `x`, `(x, y)` or `(x, y, sample_weight)`: the
      element's position. Pass the *unbatched, unshuffled* dataset and
      shuffle, augment, `cache`, `repeat` and batch afterwards. The ids
      and fingerprints are a per-example `map`, which costs every pass
      (more than a small student's epoch on 2 CPU cores). For arrays in
      memory, attach them to the arrays and slice those instead
      (`from_tensor_slices((with_sample_ids(x), y))`: the same ids and
      fingerprints, hashed once); for other data that fits in memory,
      `cache()` right after this.
    - A tensorflow-datasets split read with
      `read_config=tfds.ReadConfig(add_tfds_id=True)` (dict elements with a
      `"tfds_id"`), with `info` and `split`: the record's shard offset plus
      its index in the shard, the same in every epoch even with
      `shuffle_files=True`. With `info.supervised_keys` the elements become
      `({"inputs": image, "sample_id": ..., ...}, label)`, ready for
      `fit`; without, the dict keeps its keys and gains the two.

    Args:
        data: An unbatched `tf.data.Dataset`, or the NumPy inputs `x` (an
            array or a dict of arrays).
        info: The `tfds.core.DatasetInfo` of a tfds dataset whose elements
            carry `"tfds_id"`. Defaults to `None`.
        split: The split the dataset was loaded from (e.g. `"train"` or
            `"train[:80%]"`), with `info`. Defaults to `None`.

    Returns:
        The same kind of object with ids attached.

    Example:

    ```python
    train = tf.data.Dataset.from_tensor_slices(
        (keras_selfdistill.data.with_sample_ids(x), y))
    distiller.fit(train.shuffle(10_000).batch(64), epochs=10)

    distiller.fit(keras_selfdistill.data.with_sample_ids(x), y)

    ds, info = tfds.load("mnist", split="train", shuffle_files=True,
                         with_info=True,
                         read_config=tfds.ReadConfig(add_tfds_id=True))
    train = keras_selfdistill.data.with_sample_ids(ds, info, "train")
    teacher = keras_selfdistill.teachers.PastPredictions(
        info.splits["train"].num_examples, num_classes=10)
    ```
    """
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        if isinstance(spec, dict) and TFDS_ID in spec:
            return _tfds_ids(data, info, split)
        if info is not None:
            raise ValueError(
                "`info` names a tfds dataset, but its elements carry no "
                "'tfds_id' to key the ids by. Load it with "
                "`read_config=tfds.ReadConfig(add_tfds_id=True)` and without "
                f"`as_supervised`. Received: element_spec={spec}"
            )

        def attach(index, element):
            if isinstance(element, tuple):
                x = element[0]
                return (with_layout(x, index, fingerprint(x)),) + element[1:]
            return with_layout(element, index, fingerprint(element))

        return data.enumerate().map(attach)
    if isinstance(data, dict):
        sizes = {len(value) for value in data.values()}
    elif isinstance(data, np.ndarray):
        sizes = {len(data)}
    else:
        raise TypeError(
            "`with_sample_ids` takes an unbatched `tf.data.Dataset` or the "
            "NumPy inputs (an array or a dict of arrays). "
            f"Received: data of type {type(data).__name__}"
        )
    if len(sizes) != 1:
        raise ValueError(
            "All input arrays must hold the same number of samples. "
            f"Received: sizes {sorted(sizes)}"
        )
    size = sizes.pop()
    return with_layout(
        data,
        np.arange(size, dtype="int64"),
        array_fingerprints(data, size),
    )
