import os

import keras
import numpy as np
from keras import ops

from keras_selfdistill import _cache_files as cache
from keras_selfdistill import targets as ksd_targets
from keras_selfdistill.batch import SAMPLE_ID
from keras_selfdistill.batch import TEACHER_OUTPUTS
from keras_selfdistill.teachers._cached_join import MESSAGE_START
from keras_selfdistill.teachers._cached_join import cached_error
from keras_selfdistill.teachers._cached_join import join
from keras_selfdistill.teachers.teacher import Teacher


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class Cached(Teacher):
    """A teacher whose outputs were computed once and are read from disk.

    `keras_selfdistill.cache.write_teacher_outputs` runs the teacher over
    the training data once; this teacher reads its outputs back by sample
    id, so the training step runs no teacher forward. NumPy inputs get
    their rows once, when `fit` starts. From a `tf.data` dataset, caches
    up to 256 MB are read into memory once and the training step gathers
    each batch's rows by id (on JAX up to 16 MB, `JAX_STEP_BYTES`, which
    the compiled step holds as a constant); larger ones, and caches of
    augmented views, are joined to each batch by a last `map` of the input
    pipeline (after any shuffling and batching), from the memory map. The
    cache is never loaded whole beyond that.

    The batch is checked against the cache: on each sample's first visit
    in a `fit` call, its inputs are hashed in the input pipeline as the
    student sees them and compared with the hash of the inputs the teacher
    saw. A cache of un-augmented outputs read with random augmentation in
    the pipeline, or with other data, fails `fit` there with the ids that
    differ. A dataset of known size read for more than one epoch is hashed
    over its first pass only, after which `fit` reads the pipeline as
    given (`keras_selfdistill.Distiller.fit`); later `fit` calls on the
    same dataset object, once every sample was checked, do not hash (a
    pipeline that changes the inputs only after its first pass escapes the
    check). NumPy inputs are checked whole when `fit` starts. Augmentation
    inside the student (Keras preprocessing layers in the model) is not
    seen by the check: the targets are then the teacher's for the clean
    inputs, as a live teacher given the pipeline's inputs would compute
    them.

    Augmented views. A cache written with `augment` and `views` is read
    with the same `augment`: the join applies it to each sample's inputs
    as the writer did, for view `v = (id + epoch) mod views` (every view in
    turn, a different one for neighbouring ids), and takes the target of
    that view. The pipeline then gives the un-augmented inputs, which the
    check compares with the writer's. `epoch` is the distiller's epoch
    counter, so a resumed run sees the views an uninterrupted one would.
    Such a cache is read from `tf.data` datasets only, and is the only
    cached teacher of its distiller.

    `"dense"` caches of one model give its log-probabilities, which every
    loss and term reads like logits, at any temperature (`T_w · log p` at
    the written temperature `T_w` is the logits less a constant). A dense
    cache of an `Ensemble` holds the mixture at the temperature it was
    written at, and is read at that temperature only, as are `"top_k"`
    and `"sampled"` caches, whose sparse targets
    `keras_selfdistill.terms.Distillation` reads.

    Args:
        directory: The cache written by
            `keras_selfdistill.cache.write_teacher_outputs`.
        augment: The augmentation the cache's views were written with
            (`write_teacher_outputs(..., augment=..., views=...)`), required
            for such a cache and refused otherwise. To load a saved
            distiller, register it with
            `keras.saving.register_keras_serializable`. Defaults to `None`.
        name: Name of the teacher. Defaults to `"cached"`.

    Example:

    ```python
    train = keras_selfdistill.data.with_sample_ids(x_train)
    keras_selfdistill.cache.write_teacher_outputs(
        teacher, train, "cache", num_samples=len(x_train))
    distiller = keras_selfdistill.Distiller(student, terms=[
        keras_selfdistill.terms.Distillation(
            keras_selfdistill.teachers.Cached("cache"), temperature=4.0),
    ])
    distiller.compile(optimizer="adam", loss=...)
    distiller.fit(train, y_train, epochs=10)
    ```
    """

    keyed_by_id = True
    joins_rows = True

    def __init__(self, directory, augment=None, name=None, **kwargs):
        kwargs.pop("input_key", None)
        super().__init__(name=name, **kwargs)
        self.directory = os.fspath(directory)
        self.manifest = cache.read_manifest(self.directory)
        if not self.manifest.get("complete"):
            raise ValueError(
                f"The teacher-output cache in '{self.directory}' is "
                "incomplete: its writer stopped before the end. Run "
                "`write_teacher_outputs` again with the same arguments to "
                "finish it."
            )
        self.kind = self.manifest["kind"]
        self.num_samples = self.manifest["num_samples"]
        self.views = self.manifest.get("views")
        written = self.manifest.get("augment")
        if isinstance(augment, dict):
            augment = keras.saving.deserialize_keras_object(augment)
        given = cache.augmentation_name(augment)
        if (written is None) != (augment is None) or (
            written is not None and given != written
        ):
            raise ValueError(
                f"The cache in '{self.directory}' was written "
                + (
                    f"with {self.views} views of the augmentation "
                    f"'{written}', and is read with that augmentation only, "
                    "which replays the writer's views"
                    if written is not None
                    else "without augmentation, so it takes no `augment`"
                )
                + f". Received: augment={given!r}"
            )
        self.augment = augment
        object.__setattr__(self, "_epoch", None)
        object.__setattr__(self, "_shards", None)
        object.__setattr__(self, "_verified", None)
        object.__setattr__(self, "_verified_data", None)

    @property
    def rows_follow_epoch(self):
        return bool(self.views)

    @classmethod
    def join_rows(cls, teachers, x, given, keep_ids, later):
        return join(teachers, x, given, keep_ids, later)

    @staticmethod
    def pipeline_error(error):
        return cached_error(error)

    @property
    def temperature(self):
        """The temperature the targets were written at."""
        return self.manifest["temperature"]

    @property
    def any_temperature(self):
        """Whether the targets can be read at another temperature.

        Dense outputs of a teacher whose targets are logits can: their
        log-probabilities are the logits less a constant. A mixture's, or
        sparse targets, cannot.
        """
        return self.kind == "dense" and bool(
            self.manifest.get("any_temperature")
        )

    @property
    def target_kind(self):
        """`"logits"` when `any_temperature`; otherwise `"log_probs"` at
        the written `temperature` (sparse ones in a dict)."""
        if self.any_temperature:
            return ksd_targets.LOGITS
        return ksd_targets.LOG_PROBS

    def _epoch_variable(self):
        """The epoch the input pipeline reads to choose views."""
        if self._epoch is None:
            import tensorflow as tf

            with tf.init_scope():
                variable = tf.Variable(0, dtype=tf.int64, trainable=False)
            object.__setattr__(self, "_epoch", variable)
        return self._epoch

    def on_epoch_begin(self, epoch):
        if self.views:
            self._epoch_variable().assign(epoch)

    def _arrays(self):
        if self._shards is None:
            shards = [
                cache.open_shard(self.directory, self.manifest, shard)
                for shard in range(self.manifest["num_shards"])
            ]
            object.__setattr__(self, "_shards", shards)
        return self._shards

    # Caches up to this size are read into memory once and their rows
    # gathered by id; larger ones are read from the memory map inside the
    # input pipeline.
    IN_MEMORY_BYTES = 256 * 2**20
    # On JAX the jitted step holds the cache as a constant, and its compile
    # time grows with it (about 1 s at 64 MB here): larger in-memory caches
    # are gathered inside the input pipeline there. TensorFlow's step reads
    # every in-memory cache from a variable.
    JAX_STEP_BYTES = 16 * 2**20

    def _start(self, data):
        """Prepares the checks of a `fit` on `data`; whether any is needed.

        Every sample's inputs are checked on its first visit. A dataset
        object whose every sample was checked in an earlier `fit` is the
        same pipeline, and is not checked again.
        """
        if (
            data is self._verified_data
            and self._verified is not None
            and self._verified.all()
        ):
            return False
        object.__setattr__(self, "_verified", np.zeros(self.num_samples, bool))
        object.__setattr__(self, "_verified_data", data)
        return True

    def _in_memory_arrays(self):
        """The whole cache as NumPy arrays when it is small enough, else
        None."""
        arrays = self._arrays()
        names = cache.ARRAYS[self.kind]
        size = sum(a[n].nbytes for a in arrays for n in names)
        if size > self.IN_MEMORY_BYTES:
            return None
        return tuple(np.concatenate([a[n] for a in arrays]) for n in names)

    def _tensors(self):
        """The whole cache as TensorFlow tensors for the input pipeline
        when it is small enough, else None."""
        if "_in_memory" not in self.__dict__:
            arrays = self._in_memory_arrays()
            tensors = None
            if arrays is not None:
                import tensorflow as tf

                with tf.init_scope():
                    tensors = tuple(tf.constant(a) for a in arrays)
            object.__setattr__(self, "_in_memory", tensors)
        return self._in_memory

    def step_table(self):
        """The cache whose rows the training step gathers by id, or None.

        Backend tensors, one per array of the cache (a TensorFlow
        variable each on TensorFlow), when the cache is held in memory and
        has no augmented views; otherwise the input pipeline joins the rows
        to the batch.
        """
        if "_step_table" not in self.__dict__:
            arrays = None if self.views else self._in_memory_arrays()
            if arrays is None:
                table = None
            elif keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                with tf.init_scope():
                    table = tuple(
                        tf.Variable(a, trainable=False) for a in arrays
                    )
            elif sum(a.nbytes for a in arrays) <= self.JAX_STEP_BYTES:
                table = tuple(ops.convert_to_tensor(a) for a in arrays)
            else:
                table = None
            object.__setattr__(self, "_step_table", table)
        return self._step_table

    def unverified(self, ids):
        """Whether any of `ids` has not been checked in this `fit` yet."""
        verified = self._verified
        if verified is None:
            return np.True_
        ids = np.asarray(ids).astype("int64").reshape(-1)
        return np.bool_(not verified[ids].all())

    def rows(self, ids, fingerprints, check=True):
        """The cache rows of `ids` as NumPy arrays, checked.

        `fingerprints` are the hashes of the inputs the student sees; a
        row whose stored hash differs is an error naming the ids. With
        `check` false (every id was checked earlier in this `fit`) the
        hashes are not read.
        """
        names = cache.ARRAYS[self.kind]
        ids, out = self._read(ids, names + (("fingerprints",) if check else ()))
        if check:
            self._check(ids, out.pop("fingerprints"), fingerprints)
        return tuple(out[name] for name in names)

    def verify(self, ids, fingerprints):
        """Checks `fingerprints` of `ids` against the cache, as `rows`;
        returns `ids`, on which the batch then depends."""
        flat, out = self._read(ids, ("fingerprints",))
        self._check(flat, out["fingerprints"], fingerprints)
        return ids

    def _read(self, ids, names):
        """`(ids as a flat int64 array, {name: the rows of ids})`."""
        ids = np.asarray(ids).astype("int64").reshape(-1)
        size = self.manifest["shard_size"]
        arrays = self._arrays()
        shards, positions = ids // size, ids % size
        out = {}
        for name in names:
            first = arrays[0][name]
            out[name] = np.empty((ids.size,) + first.shape[1:], first.dtype)
        for shard in np.unique(shards):
            chosen = shards == shard
            for name in names:
                out[name][chosen] = arrays[shard][name][positions[chosen]]
        return ids, out

    def _check(self, ids, stored, fingerprints):
        given = np.asarray(fingerprints).astype("int32").reshape(-1)
        wrong = np.flatnonzero(stored != given)
        if wrong.size:
            raise ValueError(
                f"{MESSAGE_START}{self.name}': the inputs of {wrong.size} "
                f"of {ids.size} samples differ from those the teacher's "
                "outputs were written for (sample ids "
                f"{ids[wrong][:5].tolist()}...). A cache holds one target "
                "per sample, for the inputs it was written from: random "
                "augmentation in the input pipeline, or other data under the "
                "same ids, would train on targets of other inputs. Augment "
                "inside the student, cache without augmentation, or train "
                "with a live teacher. Received: fingerprints "
                f"{given[wrong][:5].tolist()}, written "
                f"{stored[wrong][:5].tolist()}"
            )
        if self._verified is not None:
            self._verified[ids] = True

    def targets(self, x, y_pred, temperature):
        outputs = x.get(TEACHER_OUTPUTS, {}) if isinstance(x, dict) else {}
        if self.name in outputs:
            values = [ops.convert_to_tensor(v) for v in outputs[self.name]]
        elif (
            isinstance(x, dict)
            and SAMPLE_ID in x
            and self.step_table() is not None
        ):
            values = _gather(self.step_table(), x[SAMPLE_ID])
        else:
            raise ValueError(
                f"The batch carries no outputs of the cached teacher "
                f"'{self.name}'. `Distiller.fit` joins them to NumPy inputs "
                "with sample ids and to `tf.data` datasets; other data "
                "(Python generators, PyDatasets) cannot be joined. Received: "
                f"input keys {sorted(x) if isinstance(x, dict) else None}"
            )
        if self.kind == "dense":
            log_probs = ops.cast(values[0], "float32")
            if self.target_kind == ksd_targets.LOGITS:
                # One model's T_w · log p_{T_w} is its logits less a
                # constant per row: softmax(it / T) is its target at T.
                log_probs = self.temperature * log_probs
            return ops.stop_gradient(log_probs)
        names = cache.ARRAYS[self.kind]
        return {
            name: ops.stop_gradient(
                value if name == "ids" else ops.cast(value, "float32")
            )
            for name, value in zip(names, values)
        }

    def get_config(self):
        config = super().get_config()
        config.pop("input_key", None)
        config["directory"] = self.directory
        if self.augment is not None:
            config["augment"] = keras.saving.serialize_keras_object(
                self.augment
            )
        return config


def _gather(table, ids):
    """The rows of `ids` (any shape; one row per id) from each tensor."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # A variable's own gather runs where the variable lives, and only
        # the rows move to the replica's device.
        return [tf.gather(t, ids) for t in table]
    return [ops.take(t, ops.cast(ids, "int32"), axis=0) for t in table]
