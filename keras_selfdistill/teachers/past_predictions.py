import keras
from keras import ops

from keras_selfdistill import _internals
from keras_selfdistill import targets as ksd_targets
from keras_selfdistill._arguments import check_positive_int
from keras_selfdistill.batch import FINGERPRINT
from keras_selfdistill.batch import SAMPLE_ID
from keras_selfdistill.batch import checked_ids
from keras_selfdistill.teachers.teacher import Teacher
from keras_selfdistill.teachers.teacher import num_classes

_LOG_PROB_FLOOR = -1e4


def _scatter_in_place(tf_variable, ids, rows):
    import tensorflow as tf

    # In place: a functional scatter would copy the whole bank per step.
    tf_variable.scatter_update(tf.IndexedSlices(rows, ids))


def _scatter_rows(variable, ids, rows):
    if keras.backend.backend() == "tensorflow":
        _scatter_in_place(variable.value, ids, rows)
    else:
        variable.assign(ops.scatter_update(variable, ids[:, None], rows))


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class PastPredictions(Teacher):
    """The student's own predictions from the previous epoch (PS-KD).

    Progressive self-knowledge distillation: each sample's target is the
    prediction the student made for that same sample one epoch earlier. The
    predictions are written into a bank from the training forward pass (no
    extra forward pass), keyed by the sample id that
    `keras_selfdistill.data.with_sample_ids` attaches, so shuffling and
    augmentation cannot misalign them. A sample not yet seen (its bank row
    is +inf, never a log-probability) has no target: the term leaves it out
    and its label loss keeps full weight (no `1 − ξ`), as in the official
    code, where the first epoch's past predictions are the one-hot labels.

    PS-KD's targets `(1 − α_t)·y + α_t·p_prev`, with `α_t = α_T·(t + 1)/T`
    in the 0-based epoch `t` of `T` (lgcnsai/PS-KD-Pytorch, `main.py`), are
    what `keras_selfdistill.recipes.ps_kd` builds: cross-entropy against
    the mixed target equals `(1 − α_t)·CE(y) + α_t·KL(p_prev ‖ p)` up to the
    constant entropy of `p_prev`, so the gradients are PS-KD's exactly.

    Each row also keeps the fingerprint of the example it was written
    from (a hash of its inputs that `with_sample_ids` takes before any
    augmentation). An id that later names another example (ids attached
    after a reshuffling `shuffle`, arrays re-sliced between `fit` calls, a
    tfds split read with shuffled files without `tfds_id`) gets no target
    and trains on its label, and the epoch's end raises a `ValueError`
    with the count: never a target from the wrong example.

    Memory: the bank stores log-probabilities, `num_samples × num_classes`
    values in `dtype` (float16 by default, 2 bytes each), plus 4 bytes of
    fingerprint per sample. ImageNet-1k
    (1,281,167 × 1,000) takes 2.57 GB in float16, 5.13 GB in float32. A
    bank over `max_bytes` fails at construction with its size.

    Reference:

    - [Kim et al., 2021](https://arxiv.org/abs/2006.12000) (PS-KD)

    Args:
        num_samples: Number of training samples (ids run from 0).
        num_classes: Number of classes of the student's outputs.
        dtype: Storage dtype of the bank, `"float16"` or `"float32"`.
            Defaults to `"float16"`.
        max_bytes: Largest bank allowed, in bytes. Defaults to 4 GiB.
        name: Name of the layer. Defaults to `"past_predictions"`.

    Example:

    ```python
    ksd = keras_selfdistill
    teacher = ksd.teachers.PastPredictions(len(x_train), num_classes=10)
    distiller = ksd.Distiller(student, [ksd.terms.Distillation(
        teacher, xi=0.5)])
    distiller.compile(optimizer="sgd", loss=keras.losses
                      .SparseCategoricalCrossentropy(from_logits=True))
    distiller.fit(ksd.data.with_sample_ids(x_train), y_train, epochs=300)
    ```
    """

    keyed_by_id = True
    writes_by_id = True
    follows_student = True

    def __init__(
        self,
        num_samples,
        num_classes,
        dtype="float16",
        max_bytes=4 * 1024**3,
        name=None,
    ):
        super().__init__(name=name)
        check_positive_int("PastPredictions", "num_samples", num_samples)
        check_positive_int("PastPredictions", "num_classes", num_classes)
        if dtype not in ("float16", "float32"):
            raise ValueError(
                "PastPredictions `dtype` must be 'float16' or 'float32'. "
                f"Received: dtype={dtype!r}"
            )
        # The rows, and an int32 fingerprint per sample.
        size = num_samples * (
            num_classes * (2 if dtype == "float16" else 4) + 4
        )
        if size > max_bytes:
            raise ValueError(
                f"The prediction bank would take {size / 1e9:.2f} GB "
                f"({num_samples:,} samples × {num_classes:,} classes × "
                f"{dtype}), over max_bytes={max_bytes:,} "
                f"({max_bytes / 1e9:.2f} GB). Raise `max_bytes` if the memory "
                "is there, or store float16."
            )
        self.num_samples = int(num_samples)
        self.num_classes = int(num_classes)
        self.storage_dtype = dtype
        self.max_bytes = max_bytes
        # +inf marks a sample not seen yet (log-probabilities are <= 0), so
        # no second variable is gathered and scattered every step. Not NaN:
        # JAX checks that every process initialises a variable alike by
        # comparing values, and NaN != NaN.
        self.bank = self.add_weight(
            shape=(num_samples, num_classes),
            initializer=keras.initializers.Constant(float("inf")),
            dtype=dtype,
            trainable=False,
            name="bank",
        )
        # The fingerprint of the example each row was written from (0: not
        # known), and how many rows this epoch found another example under
        # their id.
        self.fingerprints = self.add_weight(
            shape=(num_samples,),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            name="fingerprints",
        )
        self.mismatches = self.add_weight(
            shape=(),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            aggregation="sum",
            name="mismatches",
        )

    def attach(self, student):
        classes = num_classes(student)
        if classes is not None and classes != self.num_classes:
            raise ValueError(
                f"PastPredictions was built for {self.num_classes} classes "
                f"but the student '{student.name}' predicts {classes}. "
                f"Received: num_classes={self.num_classes}"
            )

    # The stored distribution, whatever the temperature: PS-KD's soft
    # targets are the past predictions themselves.
    target_kind = ksd_targets.LOG_PROBS

    def targets(self, x, y_pred, temperature):
        return self.targets_and_mask(x, y_pred, temperature)[0]

    def targets_and_mask(self, x, y_pred, temperature):
        if not isinstance(x, dict) or SAMPLE_ID not in x:
            raise ValueError(
                "PastPredictions keys its bank by sample id, but the batch "
                "has no 'sample_id'. Wrap the training data with "
                "`keras_selfdistill.data.with_sample_ids(...)`. Received: "
                + (
                    f"input keys {sorted(x)}"
                    if isinstance(x, dict)
                    else f"inputs of type {type(x).__name__}"
                )
            )
        ids = ops.cast(x[SAMPLE_ID], "int32")
        if len(ids.shape) != 1:
            raise ValueError(
                "Sample ids must have shape (batch,). Add them with "
                "`with_sample_ids` before batching. "
                f"Received: shape {ids.shape}"
            )
        # Floored: a float16 bank turns log-probabilities below -65504
        # into -inf, and 0 · -inf is NaN in the KL. exp(-1e4) is 0 anyway.
        current = ops.maximum(
            ops.log_softmax(
                ops.stop_gradient(ops.cast(y_pred, "float32")), axis=-1
            ),
            _LOG_PROB_FLOOR,
        )
        ids = checked_ids(ids, self.num_samples)
        stored = ops.cast(ops.take(self.bank, ids, axis=0), "float32")
        seen = ops.less(stored[:, 0], float("inf"))
        if FINGERPRINT in x:
            fingerprint = ops.cast(x[FINGERPRINT], "int32")
            known = ops.take(self.fingerprints, ids, axis=0)
            # A row written from another example is no target: it trains
            # on its label, and the epoch's end reports it.
            moved = ops.logical_and(
                seen, ops.logical_and(known != 0, known != fingerprint)
            )
            seen = ops.logical_and(seen, ops.logical_not(moved))
            self.mismatches.assign_add(ops.sum(ops.cast(moved, "int32")))
            _write_rows(self.fingerprints, ids, fingerprint, self.num_samples)
        log_probs = ops.where(seen[:, None], stored, current)
        _write_rows(
            self.bank,
            ids,
            ops.cast(current, self.bank.dtype),
            self.num_samples,
        )
        return log_probs, ops.cast(seen, "float32")

    def on_epoch_end(self, epoch):
        moved = int(_internals.to_numpy(self.mismatches))
        if moved:
            self.mismatches.assign(0)
            raise ValueError(
                f"PastPredictions '{self.name}': in epoch {epoch}, {moved} "
                "sample ids named another example than the one their past "
                "prediction was stored from (the inputs' fingerprints "
                "differ), so those samples trained on their labels only. "
                "Ids must follow the example: attach them with "
                "`with_sample_ids` to the unshuffled source, before "
                "`shuffle`, augmentation and batching; for a tfds split read "
                "with `shuffle_files=True`, load it with `read_config=tfds."
                "ReadConfig(add_tfds_id=True)` and pass `info` and `split`; "
                "arrays re-sliced between `fit` calls need a new teacher. "
                f"Received: {moved} moved ids"
            )

    def get_config(self):
        config = super().get_config()
        config.pop("input_key", None)
        config.update(
            num_samples=self.num_samples,
            num_classes=self.num_classes,
            dtype=self.storage_dtype,
            max_bytes=self.max_bytes,
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _write_rows(variable, ids, rows, num_samples):
    """Writes `rows` at `ids`, on every replica's copy of the bank.

    Under `tf.distribute.MirroredStrategy` each replica sees its slice of
    the batch; the rows of all replicas are joined in a merge call (as the
    optimizer joins gradients) and every copy receives all of them. JAX's
    `DataParallel` runs one global program: there is nothing to join.
    """
    context = None
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        _scatter_rows(variable, ids, rows)
        return

    def write(strategy, ids, rows):
        ids = tf.concat(strategy.experimental_local_results(ids), axis=0)
        rows = tf.concat(strategy.experimental_local_results(rows), axis=0)
        # Unique within each replica's slice was checked; now across them.
        ids = checked_ids(ids, num_samples)
        strategy.extended.update(
            variable.value, _scatter_in_place, args=(ids, rows)
        )

    context.merge_call(write, args=(ids, rows))
