"""Writing files: atomically, and never over a file we did not create."""

import os
import tempfile


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


def save_model(model, path, overwrite=False):
    """Saves `model` to the `.keras` file `path` atomically.

    The model is written to a temporary file in the same folder, then
    renamed over `path` (`os.replace`, atomic on POSIX and Windows), so a
    process killed mid-write leaves either the old file or the new one,
    never a truncated archive. The temporary file is removed if saving
    fails.

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
    descriptor, temporary = tempfile.mkstemp(
        suffix=".keras", prefix=".saving-", dir=folder
    )
    os.close(descriptor)
    try:
        model.save(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
