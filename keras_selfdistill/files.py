"""Writing files: atomically, never over a file we did not create, and
recording the weights they were made from."""

import contextlib
import hashlib
import os
import tempfile

import numpy as np

from keras_selfdistill import _internals


def check_writable(path, overwrite=False):
    """Fails unless `save_model(model, path, overwrite)` would write `path`.

    For programs that should refuse before a long training, not after it.

    Args:
        path: Destination, ending in `.keras`.
        overwrite: Whether an existing file at `path` may be replaced.
            Defaults to `False`.

    Example:

    ```python
    keras_selfdistill.files.check_writable("student.keras")
    ```
    """
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(
            f"The model file name must end in `.keras`. Received: path={path!r}"
        )
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path} exists and may not be ours to replace. Choose another "
            "path, remove it, or pass `overwrite=True` (`--overwrite`)."
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"The folder {folder} does not exist, so {path} cannot be "
            "written. Create it first (`os.makedirs`). "
            f"Received: path={path!r}"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(
            f"The folder {folder} is not writable, so {path} cannot be "
            "written. Choose a writable folder or change its permissions. "
            f"Received: path={path!r}"
        )


_TEMPORARY_PREFIX = ".saving-"


def _remove_stale_temporaries(folder, name):
    # A process killed mid-save leaves its full-size temporary behind; the
    # pid in its name tells whether its writer is gone.
    prefix = f"{_TEMPORARY_PREFIX}{name}-"
    for entry in os.listdir(folder):
        if not (entry.startswith(prefix) and entry.endswith(".keras")):
            continue
        pid = entry[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            # Another save may have removed it first.
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, entry))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _default_mode():
    # What `open(path, "w")`, and so Keras's own `save`, gives a new file.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_model(model, path, overwrite=False):
    """Saves `model` to the `.keras` file `path` atomically.

    The model is written to a temporary file in the same folder, then
    renamed over `path` (`os.replace`, atomic on POSIX and Windows), so a
    process killed mid-write leaves either the old file or the new one,
    never a truncated archive. The temporary file is removed if saving
    fails, and one left by a killed process is removed by the next save to
    the same path. The file gets the permissions Keras's own `save` gives
    under the same umask.

    Args:
        model: The `keras.Model` to save.
        path: Destination, ending in `.keras`.
        overwrite: Whether to replace an existing file at `path`. Defaults
            to `False`: an existing file is an error, since it may not be
            ours to replace.

    Example:

    ```python
    keras_selfdistill.files.save_model(distiller.student, "student.keras")
    ```
    """
    path = os.fspath(path)
    check_writable(path, overwrite)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    _remove_stale_temporaries(folder, name)
    descriptor, temporary = tempfile.mkstemp(
        suffix=".keras",
        prefix=f"{_TEMPORARY_PREFIX}{name}-{os.getpid()}-",
        dir=folder,
    )
    os.close(descriptor)
    try:
        model.save(temporary)
        os.chmod(temporary, _default_mode())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def weights_fingerprint(variables):
    """A hash of variables' values: which weights a file was made from.

    The dtype, shape and bytes of each variable, in order; names are left
    out, so the same weights in a model built again hash the same. 16
    hexadecimal digits of a SHA-256.

    Args:
        variables: An iterable of Keras variables (e.g. `model.weights`).

    Returns:
        A string.

    Example:

    ```python
    keras_selfdistill.files.weights_fingerprint(model.weights)
    ```
    """
    digest = hashlib.sha256()
    for variable in variables:
        value = np.ascontiguousarray(_internals.to_numpy(variable))
        digest.update(str((value.dtype.str, value.shape)).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]
