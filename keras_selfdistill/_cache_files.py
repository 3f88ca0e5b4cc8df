"""The files of a teacher-output cache: their layout, read and opened.

A cache is a directory of NumPy `.npy` files, readable without this
library (`numpy.load`, memory-mapped):


- `manifest.json`: the format, the kind of targets, `num_samples`, the
  per-sample output shape, the temperature the targets were taken at, the
  shard size, the teacher's name and the fingerprint of its weights
  (`keras_selfdistill.cache.teacher_fingerprint`: a writer refuses to
  continue a cache of another teacher) and whether the cache is complete;
- `shard-00000/`, `shard-00001/`, ...: shard `s` holds the samples with ids
  `s · shard_size` to `(s + 1) · shard_size − 1`, one row per sample id:
  - `fingerprints.npy` (`int32`): the hash of the inputs the teacher saw,
    0 where no row was written yet;
  - `dense`: `log_probs.npy`, the teacher's log-probabilities;
  - `top_k`: `ids.npy` and `log_probs.npy` (the `k` most likely classes,
    most likely first) and `rest.npy` (the log of the mass outside them);
  - `sampled`: `ids.npy`, `weights.npy` and `log_probs.npy`: the distinct
    classes among `k` draws from the teacher's distribution, their share
    of the draws and their log-probability (RS-KD); the manifest says
    whether the draws were independent or systematic (`"sampling"`).

NumPy files rather than TFRecord or a saved `tf.data` dataset: a row is
found by its id with one memory-mapped read, so training reads the rows of
a shuffled batch without holding the cache in memory and without a join
over a second dataset; a writer that stops writes whole rows and marks them
last, so a restarted one continues where it stopped; and any NumPy reads
it.
"""

import json
import os

import numpy as np

from keras_selfdistill.batch import INPUTS
from keras_selfdistill.batch import SAMPLE_ID
from keras_selfdistill.batch import select_input

FORMAT = "keras_selfdistill.teacher_outputs"
VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("dense", "top_k", "sampled")
SAMPLING = ("multinomial", "systematic")
# The file of each kind's arrays, in the order the targets use them.
ARRAYS = {
    "dense": ("log_probs",),
    "top_k": ("ids", "log_probs", "rest"),
    "sampled": ("ids", "weights", "log_probs"),
}
# The lowest log-probability stored: float16 holds it, and exp() of it is 0.
LOG_FLOOR = -1e4


def manifest_path(directory):
    return os.path.join(os.fspath(directory), MANIFEST)


def read_manifest(directory):
    """The manifest of the cache in `directory`, checked."""
    path = manifest_path(directory)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No teacher-output cache in '{os.fspath(directory)}': it has no "
            f"{MANIFEST}. Write one with "
            "`keras_selfdistill.cache.write_teacher_outputs`."
        )
    with open(path) as file:
        manifest = json.load(file)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"'{path}' is not a keras_selfdistill teacher-output cache of "
            f"version {VERSION}. Received: format={manifest.get('format')!r}, "
            f"version={manifest.get('version')!r}"
        )
    return manifest


def shard_directory(directory, shard):
    return os.path.join(os.fspath(directory), f"shard-{shard:05d}")


def array_specs(manifest):
    """`{name: (row shape, dtype)}` of the kind's arrays.

    The row shape of a cache of augmented views starts with the views.
    """
    shape = tuple(manifest["output_shape"])
    positions, vocabulary = shape[:-1], shape[-1]
    k = manifest.get("k")
    ids = "uint16" if vocabulary <= np.iinfo("uint16").max else "int32"
    dtype = manifest["dtype"]
    if manifest["kind"] == "dense":
        specs = {"log_probs": (shape, dtype)}
    elif manifest["kind"] == "top_k":
        specs = {
            "ids": (positions + (k,), ids),
            "log_probs": (positions + (k,), dtype),
            "rest": (positions, "float32"),
        }
    else:
        specs = {
            "ids": (positions + (k,), ids),
            "weights": (positions + (k,), dtype),
            "log_probs": (positions + (k,), dtype),
        }
    views = manifest.get("views")
    if views:
        # One row per sample holds all its views: `(views, ...)`.
        specs = {n: ((views,) + shape, t) for n, (shape, t) in specs.items()}
    return specs


def open_shard(directory, manifest, shard, mode="r"):
    """The memory-mapped arrays of one shard, fingerprints included.

    With `mode="r+"` (the writer), missing files are created, each under a
    temporary name and renamed whole, fingerprints last: a writer killed
    while it creates one leaves no file that cannot be opened. A file that
    cannot be opened in a shard whose fingerprints mark no row holds
    nothing yet (an interrupted creation by an earlier version): it is
    created again.
    """
    folder = shard_directory(directory, shard)
    size = manifest["shard_size"]
    # The last shard holds the samples that are left.
    rows = min(size, manifest["num_samples"] - shard * size)
    specs = dict(array_specs(manifest))
    specs["fingerprints"] = ((), "int32")
    arrays = {}
    for name, (shape, dtype) in specs.items():
        path = os.path.join(folder, f"{name}.npy")
        if mode == "r":
            arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
            continue
        if os.path.exists(path):
            try:
                arrays[name] = np.load(path, mmap_mode="r+", allow_pickle=False)
                continue
            except (EOFError, ValueError) as error:
                if written_rows(folder):
                    raise ValueError(
                        f"The cache file {path} cannot be read, and rows of "
                        "its shard are marked written: the cache is "
                        "damaged. Write it into a new directory. Received: "
                        f"{type(error).__name__}: {error}"
                    ) from error
        os.makedirs(folder, exist_ok=True)
        temporary = f"{path}.tmp"
        array = np.lib.format.open_memmap(
            temporary, mode="w+", dtype=dtype, shape=(rows,) + shape
        )
        # The memory map follows the file through its rename.
        os.replace(temporary, path)
        arrays[name] = array
    return arrays


def written_rows(folder):
    """How many rows the shard in `folder` marks written (0 without a
    readable fingerprints file)."""
    path = os.path.join(folder, "fingerprints.npy")
    try:
        fingerprints = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, EOFError, ValueError):
        return 0
    return int(np.count_nonzero(fingerprints))


def augmentation_name(augment):
    """The name the manifest records for `augment` (`None` without one)."""
    if augment is None:
        return None
    name = getattr(augment, "__qualname__", None) or type(augment).__name__
    module = getattr(augment, "__module__", None)
    return name if module is None else f"{module}.{name}"


def view_inputs(x, augment, seed, views, view, batched):
    """`x` with its inputs replaced by their augmented view `view`.

    `x` holds the inputs with sample ids (a batch when `batched`); `view` is
    a view index, one for the batch or one per sample. Sample `i`'s view
    `v` is `augment(inputs, [seed, i · views + v])`, the seeds the writer
    used.
    """
    import tensorflow as tf

    ids = tf.reshape(tf.cast(x[SAMPLE_ID], "int64"), [-1])
    view = tf.cast(view, "int64") + tf.zeros_like(ids)
    first = tf.fill(tf.shape(ids), tf.constant(seed, "int64"))
    seeds = tf.stack([first, ids * views + view], axis=1)
    inputs = select_input(x, None, "The augmentation")
    if batched:
        specs = tf.nest.map_structure(
            lambda t: tf.TensorSpec(t.shape[1:], t.dtype), inputs
        )
        augmented = tf.map_fn(
            lambda pair: augment(pair[0], pair[1]),
            (inputs, seeds),
            fn_output_signature=specs,
        )
    else:
        augmented = augment(inputs, seeds[0])
    if INPUTS in x:
        return dict(x, **{INPUTS: augmented})
    # Inputs that are a dict of features: `augment` returns the features.
    return dict(x, **augmented)
