"""Input pipelines for teachers that keep per-sample state."""

import numpy as np

from keras_selfdistill.teachers.teacher import INPUTS
from keras_selfdistill.teachers.teacher import SAMPLE_ID


def _with_id(x, sample_id):
    if isinstance(x, dict):
        if SAMPLE_ID in x:
            raise ValueError(
                f"The inputs already hold a '{SAMPLE_ID}' key. Add sample ids "
                f"once. Received: keys {sorted(x)}"
            )
        return {**x, SAMPLE_ID: sample_id}
    return {INPUTS: x, SAMPLE_ID: sample_id}


def with_sample_ids(data):
    """Attaches a stable sample id to every training example.

    Teachers that keep per-sample state (`keras_selfdistill.teachers.
    PastPredictions`) key it by this id, never by batch position, so
    shuffling and augmentation cannot misalign it. The inputs become
    `{"inputs": x, "sample_id": id}` (or gain a `"sample_id"` key when they
    are already a dict); the `Distiller` and its teachers strip the id
    before calling their models, and `predict` accepts plain inputs.

    For a `tf.data.Dataset`, pass the *unbatched, unshuffled* dataset and
    shuffle, augment and batch afterwards: the id is the element's position
    in the original order. A dataset that is already batched (elements with
    a batch axis) would get one id per batch; `PastPredictions` then fails
    on the shape. For NumPy inputs, pass the input array (or dict of
    arrays); Keras's `shuffle=True` permutes ids with the rows.

    Args:
        data: An unbatched `tf.data.Dataset` of `x`, `(x, y)` or
            `(x, y, sample_weight)` elements, or the NumPy inputs `x`.

    Returns:
        The same kind of object with ids attached.

    Example:

    ```python
    train = keras_selfdistill.data.with_sample_ids(
        tf.data.Dataset.from_tensor_slices((x, y)))
    train = train.shuffle(10_000).batch(64)
    distiller.fit(train, epochs=10)

    distiller.fit(keras_selfdistill.data.with_sample_ids(x), y)
    ```
    """
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):

        def attach(index, element):
            if isinstance(element, tuple):
                return (_with_id(element[0], index),) + element[1:]
            return _with_id(element, index)

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
    return _with_id(data, np.arange(sizes.pop(), dtype="int64"))
