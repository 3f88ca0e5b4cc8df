"""Teacher outputs computed once, written to disk, read with the batches.

`write_teacher_outputs` runs a teacher over the training data once and
writes its outputs, keyed by sample id, in the format that
`keras_selfdistill._cache_files` describes (NumPy `.npy` shards and a
JSON manifest, readable without this library);
`keras_selfdistill.teachers.Cached` reads them back.

`write_teacher_outputs` is 190 lines, 115 of them its docstring (the
three kinds of targets, augmented views, restarts); the module, 510.
"""

import hashlib
import json
import os

import keras
import numpy as np

from keras_selfdistill import _arguments
from keras_selfdistill import targets as ksd_targets
from keras_selfdistill._cache_files import ARRAYS
from keras_selfdistill._cache_files import FORMAT
from keras_selfdistill._cache_files import KINDS
from keras_selfdistill._cache_files import LOG_FLOOR
from keras_selfdistill._cache_files import SAMPLING
from keras_selfdistill._cache_files import VERSION
from keras_selfdistill._cache_files import augmentation_name
from keras_selfdistill._cache_files import manifest_path
from keras_selfdistill._cache_files import open_shard
from keras_selfdistill._cache_files import read_manifest
from keras_selfdistill._cache_files import shard_directory
from keras_selfdistill._cache_files import view_inputs
from keras_selfdistill._cache_files import written_rows
from keras_selfdistill._sparse_targets import sample
from keras_selfdistill._sparse_targets import top_k
from keras_selfdistill.batch import SAMPLE_ID
from keras_selfdistill.batch import check_ids
from keras_selfdistill.batch import fingerprints_of
from keras_selfdistill.batch import select_input
from keras_selfdistill.files import weights_fingerprint
from keras_selfdistill.teachers.frozen_model import as_teacher


def _batches(data, batch_size, augment=None, seed=0, views=None):
    """Batches of `(inputs with ids, fingerprints, views)` as NumPy.

    From any supported data; `views` holds the batch's augmented views
    (inputs with ids, one per view), computed in the input pipeline, or is
    `None` without augmentation.
    """
    import tensorflow as tf

    if isinstance(data, dict) and SAMPLE_ID in data:
        data = tf.data.Dataset.from_tensor_slices(data)
    if not isinstance(data, tf.data.Dataset):
        raise TypeError(
            "`data` must be the inputs with sample ids "
            "(`keras_selfdistill.data.with_sample_ids(x)`) or a "
            "`tf.data.Dataset` of them. Received: data of type "
            f"{type(data).__name__}"
        )
    spec = data.element_spec
    x_spec = spec[0] if isinstance(spec, tuple) else spec
    if not isinstance(x_spec, dict) or SAMPLE_ID not in x_spec:
        raise ValueError(
            "The teacher's outputs are keyed by sample id: attach ids with "
            "`keras_selfdistill.data.with_sample_ids` before writing. "
            f"Received: element_spec={spec}"
        )
    if x_spec[SAMPLE_ID].shape.rank == 0:
        data = data.batch(batch_size)

    def first(*element):
        # The hash of the inputs the teacher sees (before any augmentation),
        # stored beside its rows.
        x = element[0]
        inputs = select_input(x, None, "write_teacher_outputs")
        viewed = ()
        if views is not None:
            viewed = tuple(
                view_inputs(x, augment, seed, views, view, True)
                for view in range(views)
            )
        return x, fingerprints_of(inputs, batched=True), viewed

    for x, prints, viewed in data.map(first).as_numpy_iterator():
        yield x, prints, (list(viewed) if views is not None else None)


class _Targets(keras.Model):
    """The teacher's target log-probabilities at `T` for a batch, compiled
    by Keras."""

    def __init__(self, teacher, temperature):
        super().__init__(name="teacher_targets")
        self.teacher = teacher
        self.temperature = temperature

    def call(self, x):
        return ksd_targets.log_probs(
            self.teacher.targets(x, None, self.temperature),
            self.teacher.target_kind,
            self.temperature,
        )


def teacher_fingerprint(teacher):
    """A hash of what decides a teacher's outputs: its weights.

    Over every teacher it holds (`walk`): the class, an ensemble's mixture
    weights, and `keras_selfdistill.files.weights_fingerprint` of its
    models. Names are left out, so the same teacher rebuilt elsewhere has
    the same fingerprint.
    """
    digest = hashlib.sha256()
    for leaf in teacher.walk():
        digest.update(type(leaf).__name__.encode())
        digest.update(repr(getattr(leaf, "teacher_weights", None)).encode())
        for model in leaf.feature_models():
            digest.update(weights_fingerprint(model.variables).encode())
    return digest.hexdigest()[:16]


def _count_written(directory, manifest, shards=None):
    if shards is None:
        shards = range(manifest["num_shards"])
    return sum(
        written_rows(shard_directory(directory, shard)) for shard in shards
    )


def write_teacher_outputs(
    teacher,
    data,
    directory,
    num_samples,
    kind="dense",
    k=None,
    temperature=1.0,
    dtype="float16",
    shard_size=4096,
    batch_size=256,
    seed=0,
    verbose="auto",
    augment=None,
    views=None,
    sampling=None,
    process_index=None,
    process_count=None,
):
    """Runs a teacher once over a dataset and writes its outputs to disk.

    The targets of every sample are written under its sample id (the ids
    `keras_selfdistill.data.with_sample_ids` attaches, tfds ids included),
    with the fingerprint of the inputs the teacher saw, in shards of
    memory-mapped NumPy files (the format is described in this module's
    docstring). The data are streamed batch by batch, so neither they nor
    the cache have to fit in memory; a progress bar counts the samples.

    A writer that stops (killed, out of disk) is restarted with the same
    call: the rows already written are kept and their batches skipped, and
    the finished cache is identical to one written without stopping (a
    row's fingerprint is written after its targets, so a row is either
    complete or rewritten). The manifest says `"complete": true` only at
    the end. A directory that holds a cache written with other settings
    is refused.

    Three kinds of targets, taken at `temperature` (`softmax(z / T)`):

    - `"dense"`: every class's log-probability, for classification (10
      classes in float16: 20 bytes per sample);
    - `"top_k"`: the `k` most likely classes with their log-probabilities
      and the log of the mass outside them, which the losses keep as one
      extra class (top-k targets without it are biased: RS-KD, §3);
    - `"sampled"`: RS-KD's random sampling, `k` draws per position from the
      teacher's distribution, stored as the distinct classes with their
      share of the draws (an unbiased estimate of the distribution) and
      their log-probabilities. Each sample's draws are seeded by `seed`
      and its id. With `sampling="systematic"` the `k` draws of a position
      are evenly spaced through the teacher's cumulative distribution
      from one random offset (systematic sampling): still unbiased, each
      class is drawn `⌊k·p⌋` or `⌈k·p⌉` times instead of a binomial
      number, so a cache of `k` draws carries less noise. This is our
      addition; RS-KD draws independently (`"multinomial"`, the default).

    Augmented views. With `augment` and `views`, each sample is written
    `views` times, for `augment(x, seed)` of its inputs at the seeds
    `[seed, id · views + v]`, `v = 0 … views − 1`: the augmentation is
    replayable, so training (`keras_selfdistill.teachers.Cached` given the
    same `augment`) applies the same augmentation to the inputs it reads
    and takes the target of that view. `views` equal to the number of
    epochs gives every epoch its own augmentation of every sample.

    Several processes. Run by `process_count` processes on the same data
    and directory (a multi-host JAX job: by default JAX's
    `process_index()` and `process_count()`), each process runs the
    teacher on the samples of its own shards (shard `s` belongs to
    process `s % process_count`) and writes them; the cache is the one a
    single process writes. Whichever process finishes last finds every
    row written and marks the manifest complete; a process that finishes
    earlier returns with it still incomplete.

    Reference:

    - [Anshumann et al., 2025](https://arxiv.org/abs/2503.16870) (RS-KD,
      Sparse Logit Sampling)

    Args:
        teacher: A `keras.Model` returning logits, or a
            `keras_selfdistill.teachers.Teacher` whose targets are a
            function of the inputs (`FrozenModel`, `Ensemble`).
        data: The inputs with sample ids
            (`keras_selfdistill.data.with_sample_ids(x)`), or a
            `tf.data.Dataset` of them (`x` or `(x, y, ...)`, batched or
            not), without random augmentation: the cache holds one target
            per sample (per view with `augment`).
        directory: Where the cache is written (created if missing). A
            directory holding a cache written with other settings is
            refused.
        num_samples: Number of sample ids (ids are `0 … num_samples − 1`).
        kind: `"dense"`, `"top_k"` or `"sampled"`. Defaults to `"dense"`.
        k: Classes kept per position (`"top_k"`) or draws per position
            (`"sampled"`). Required for those kinds.
        temperature: Temperature of the stored distribution. Sparse
            targets are read at this temperature only. Defaults to `1.0`.
        dtype: `"float16"` or `"float32"` for the log-probabilities and
            weights. Defaults to `"float16"`.
        shard_size: Samples per shard. Defaults to `4096`.
        batch_size: Batch size for unbatched data. Defaults to `256`.
        seed: Seed of the `"sampled"` draws. Defaults to `0`.
        verbose: `"auto"`, `0` or `1`: the progress bar. Defaults to
            `"auto"` (shown).
        augment: A stateless augmentation `augment(x, seed)` of one
            example's inputs, written with TensorFlow ops (it runs in the
            input pipeline on every backend), `seed` a shape-`(2,)` int64
            tensor for `tf.image.stateless_random_*` and
            `tf.random.stateless_*`. It must return inputs of the same
            shape and dtype. Requires `views`. Defaults to `None`.
        views: Number of augmented views written per sample (an integer
            >= 1) with `augment`. Defaults to `None` (no augmentation).
        sampling: How `"sampled"` targets are drawn: `"multinomial"`
            (independent draws, RS-KD's) or `"systematic"` (evenly spaced
            draws from one random offset per position). Defaults to `None`,
            which is `"multinomial"` for `"sampled"` and refused with other
            kinds.
        process_index: This process's index among `process_count` writers.
            Defaults to `None`: JAX's `process_index()` on the JAX backend,
            else 0.
        process_count: Number of processes writing the cache together.
            Defaults to `None`: JAX's `process_count()` on the JAX backend,
            else 1.

    Returns:
        The manifest, a dict.

    Example:

    ```python
    train = keras_selfdistill.data.with_sample_ids(x_train)
    keras_selfdistill.cache.write_teacher_outputs(
        teacher, train, "teacher_cache", num_samples=len(x_train))
    # Any NumPy reads it: the log-probabilities of samples 0 ... 4095.
    numpy.load("teacher_cache/shard-00000/log_probs.npy", mmap_mode="r")
    ```
    """
    settings = _settings(
        kind,
        k,
        num_samples,
        shard_size,
        batch_size,
        temperature,
        dtype,
        seed,
        augment,
        views,
        sampling,
    )
    # The name the user gave (a model's, or the teacher's), for the record.
    teacher_name = getattr(teacher, "name", None)
    teacher = as_teacher(teacher, "write_teacher_outputs")
    if any(t.keyed_by_id or t.follows_student for t in teacher.walk()):
        raise ValueError(
            "Only a teacher whose targets are a function of the inputs can "
            "be cached (a FrozenModel or an Ensemble of them). Received: "
            f"teacher={type(teacher).__name__}"
        )
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    targets = _Targets(teacher, float(temperature))
    manifest = _stored_manifest(directory, settings)
    identity = teacher_fingerprint(teacher)
    if manifest is not None and manifest.get("teacher_fingerprint") not in (
        None,
        identity,
    ):
        raise ValueError(
            f"'{directory}' holds the outputs of another teacher: the "
            "fingerprint of its weights is "
            f"{manifest['teacher_fingerprint']}, this teacher's {identity} "
            "(retrained, or another model). A cache holds one teacher's "
            "outputs: write these into a new directory, or delete the old "
            f"cache first. Received: teacher={teacher_name!r}"
        )
    progress = keras.utils.Progbar(
        int(num_samples),
        verbose=1 if verbose == "auto" else verbose,
        unit_name="sample",
    )
    index, count = _processes(process_index, process_count)
    num_shards = -(-int(num_samples) // int(shard_size))
    own = [s for s in range(num_shards) if s % count == index]
    expected = sum(
        min(shard_size, int(num_samples) - s * shard_size) for s in own
    )
    shards = {}
    # The most rows of a batch so far: shorter batches are padded to it.
    width = 0
    written = 0
    if manifest is not None:
        written = _count_written(directory, manifest, own)
    progress.update(written)
    for x, prints, viewed in _batches(data, batch_size, augment, seed, views):
        ids = np.asarray(x[SAMPLE_ID]).astype("int64").reshape(-1)
        check_ids(ids, num_samples, unique=False)
        if count > 1:
            mine = (ids // shard_size) % count == index
            if not mine.any():
                continue
            x, prints, viewed = _rows_of_batch((x, prints, viewed), mine)
            ids = ids[mine]
        if manifest is not None:
            done = np.array(
                [
                    _shard(shards, directory, manifest, i)["fingerprints"][
                        i % shard_size
                    ]
                    for i in ids
                ]
            )
            if np.all(done == prints):
                continue
        width = max(width, ids.size)
        log_probs, fresh = _batch_rows(targets, x, viewed, ids, width, settings)
        if manifest is None:
            manifest = dict(
                settings,
                output_shape=list(log_probs.shape[1:]),
                teacher=teacher_name,
                teacher_fingerprint=identity,
                # Logits' log-probabilities are the logits less a
                # constant, valid at any temperature; a mixture's are not.
                any_temperature=teacher.target_kind == ksd_targets.LOGITS,
                complete=False,
            )
            _write_manifest(directory, manifest)
        written += _write_rows(shards, directory, manifest, ids, prints, fresh)
        progress.update(written)
    if manifest is None and expected:
        raise ValueError("`data` holds no samples: nothing was written.")
    if written < expected:
        what = "" if count == 1 else f" (this process's shards {own})"
        raise ValueError(
            f"The data held {written} of num_samples={num_samples} sample "
            f"ids{what}, of which {expected} are to be written here: a "
            "cache must hold every sample the training data can name. Pass "
            "the whole split, or the right `num_samples`."
        )
    if manifest is None:
        # A process without shards: the others write the cache.
        return _stored_manifest(directory, settings)
    # The last process to finish sees every row (each flushes its rows
    # before counting) and marks the cache complete.
    if count == 1 or _count_written(directory, manifest) == num_samples:
        manifest["complete"] = True
        _write_manifest(directory, manifest)
    return manifest


def _processes(index, count):
    """`(process index, process count)` of the writers."""
    if index is None and count is None:
        if keras.backend.backend() == "jax":
            import jax

            return jax.process_index(), jax.process_count()
        return 0, 1
    if (
        not _arguments.is_integer(count)
        or not _arguments.is_integer(index)
        or count < 1
        or not 0 <= index < count
    ):
        raise ValueError(
            "`process_index` and `process_count` name this writer among "
            "several: integers with 0 <= process_index < process_count. "
            f"Received: process_index={index!r}, process_count={count!r}"
        )
    return int(index), int(count)


def _rows_of_batch(structure, keep):
    """The rows `keep` of every array in `structure` (`None` kept)."""
    return keras.tree.map_structure(
        lambda a: None if a is None else np.asarray(a)[keep], structure
    )


def _settings(
    kind,
    k,
    num_samples,
    shard_size,
    batch_size,
    temperature,
    dtype,
    seed,
    augment,
    views,
    sampling,
):
    """The manifest's settings of a writer's arguments, checked."""
    if kind not in KINDS:
        raise ValueError(
            f"`kind` must be one of {KINDS}. Received: kind={kind!r}"
        )
    if kind != "dense" and (not _arguments.is_integer(k) or k < 1):
        raise ValueError(
            f"`k` (classes kept or draws per position) must be an integer "
            f'>= 1 for kind="{kind}". Received: k={k!r}'
        )
    if kind == "dense" and k is not None:
        raise ValueError(
            f'`k` applies to "top_k" and "sampled" targets; "dense" keeps '
            f"every class. Received: k={k!r}"
        )
    for name, value in (
        ("num_samples", num_samples),
        ("shard_size", shard_size),
        ("batch_size", batch_size),
    ):
        if not _arguments.is_integer(value) or value < 1:
            raise ValueError(
                f"`{name}` must be an integer >= 1. Received: {name}={value!r}"
            )
    if not _arguments.is_number(temperature) or temperature <= 0:
        raise ValueError(
            "`temperature` must be a number > 0. "
            f"Received: temperature={temperature!r}"
        )
    if dtype not in ("float16", "float32"):
        raise ValueError(
            f'`dtype` must be "float16" or "float32". Received: dtype={dtype!r}'
        )
    if kind == "sampled" and sampling is None:
        sampling = "multinomial"
    if sampling is not None and (kind != "sampled" or sampling not in SAMPLING):
        raise ValueError(
            f'`sampling` is one of {SAMPLING}, for kind="sampled" only. '
            f"Received: sampling={sampling!r}, kind={kind!r}"
        )
    if (augment is None) != (views is None):
        raise ValueError(
            "Augmented views need both `augment` (the stateless "
            "augmentation) and `views` (how many per sample). Received: "
            f"augment={augment!r}, views={views!r}"
        )
    if views is not None and (not _arguments.is_integer(views) or views < 1):
        raise ValueError(
            f"`views` must be an integer >= 1. Received: views={views!r}"
        )
    if augment is not None and not callable(augment):
        raise TypeError(
            "`augment` must be a function `augment(x, seed)`. Received: "
            f"augment={augment!r}"
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "k": None if kind == "dense" else int(k),
        "num_samples": int(num_samples),
        "shard_size": int(shard_size),
        "num_shards": -(-int(num_samples) // int(shard_size)),
        "temperature": float(temperature),
        "dtype": dtype,
        "seed": int(seed),
        "views": None if views is None else int(views),
        "augment": augmentation_name(augment),
        "sampling": sampling,
    }


def _stored_manifest(directory, settings):
    """The manifest a stopped writer left, or None; refused if it differs."""
    if not os.path.exists(manifest_path(directory)):
        return None
    manifest = read_manifest(directory)
    stored = {key: manifest.get(key) for key in settings}
    if stored != settings:
        changed = sorted(k for k in settings if stored[k] != settings[k])
        raise ValueError(
            f"'{directory}' holds a cache written with other settings "
            f"({', '.join(changed)}). Write to a new directory, or "
            "repeat the first call's arguments to continue it. Received: "
            + ", ".join(
                f"{key}={settings[key]!r} (stored {stored[key]!r})"
                for key in changed
            )
        )
    return manifest


def _batch_rows(targets, x, viewed, ids, width, settings):
    """`(log-probabilities, the rows to write)` of one batch.

    The log-probabilities are the first view's with augmented views.
    """
    kind, k, seed = settings["kind"], settings["k"], settings["seed"]
    sampling, views = settings["sampling"], settings["views"]
    if views is None:
        log_probs = _predict(targets, x, ids.size, width)
        fresh = _rows_of(kind, log_probs, k, seed, ids, sampling)
    else:
        per_view = [
            _predict(targets, inputs, ids.size, width) for inputs in viewed
        ]
        log_probs = per_view[0]
        # Each view's draws have a seed of their own.
        fresh = [
            np.stack(arrays, axis=1)
            for arrays in zip(
                *(
                    _rows_of(
                        kind, values, k, seed, ids * views + view, sampling
                    )
                    for view, values in enumerate(per_view)
                )
            )
        ]
    fresh = [
        np.maximum(a, LOG_FLOOR) if n in ("log_probs", "rest") else a
        for n, a in zip(ARRAYS[kind], fresh)
    ]
    return log_probs, fresh


def _write_rows(shards, directory, manifest, ids, prints, fresh):
    """Writes a batch's rows, each fingerprint last; returns the new rows."""
    names = ARRAYS[manifest["kind"]]
    written = 0
    for i, row in enumerate(ids):
        arrays = _shard(shards, directory, manifest, row)
        position = row % manifest["shard_size"]
        new = arrays["fingerprints"][position] == 0
        for name, values in zip(names, fresh):
            arrays[name][position] = values[i]
        arrays["fingerprints"][position] = prints[i]
        written += int(new)
    for arrays in shards.values():
        for array in arrays.values():
            array.flush()
    return written


def _rows_of(kind, log_probs, k, seed, ids, sampling=None):
    if kind == "dense":
        return (log_probs,)
    if kind == "top_k":
        if k > log_probs.shape[-1]:
            raise ValueError(
                f"`k={k}` is more than the teacher's "
                f"{log_probs.shape[-1]} classes."
            )
        return top_k(log_probs.astype("float64"), k)
    return sample(log_probs.astype("float64"), k, seed, ids, sampling)


def _to_numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value), "float64")


def _predict(targets, x, rows, width):
    """The targets of a batch of `rows` rows, computed on `width` rows.

    A shorter batch of arrays (the last one, usually) is padded by repeating
    its last row, and the padding's outputs are dropped: every batch then
    has the traced shape, and Keras's predict function is traced once per
    writer instead of again for the last batch.
    """
    leaves = keras.tree.flatten(x)
    if rows < width and all(isinstance(a, np.ndarray) for a in leaves):
        x = keras.tree.map_structure(
            lambda a: np.concatenate([a, np.repeat(a[-1:], width - rows, 0)]),
            x,
        )
    return _to_numpy(targets.predict_on_batch(x))[:rows]


def _shard(shards, directory, manifest, sample_id):
    shard = int(sample_id) // manifest["shard_size"]
    if shard not in shards:
        shards[shard] = open_shard(directory, manifest, shard, mode="r+")
    return shards[shard]


def _write_manifest(directory, manifest):
    # Written whole to a temporary file and renamed: a killed writer never
    # leaves a half-written manifest.
    path = manifest_path(directory)
    # A temporary of this process's own: several writers may write the
    # same manifest at once.
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as file:
        json.dump(manifest, file, indent=1, sort_keys=True)
    os.replace(temporary, path)
