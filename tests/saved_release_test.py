"""Distillers saved by release 0.1.0 load with the current code.

The files were written at commit 7b59590 by
`tests/fixtures/make_release_0_1.py` (TensorFlow backend); each is loaded
here on the suite's backend, its student predicts what it predicted then,
every variable holds the value it held, and training continues. Keras
reads the files of its own and earlier versions: under an older Keras
(`make test-min`) these tests skip, naming both versions.
"""

import json
import os
import zipfile

import keras
import numpy as np
import pytest

import keras_selfdistill
from tests.tiny import ONCE

FOLDER = os.path.join(os.path.dirname(__file__), "fixtures", "release_0_1")
NAMES = ("teachers", "self_teachers", "exits", "features")


def _key(value):
    value = np.asarray(value)
    return str(value.dtype), value.shape, value.tobytes()


def _version(text):
    return tuple(int(part) for part in text.split(".")[:3])


def _load(name):
    path = os.path.join(FOLDER, f"{name}.keras")
    with zipfile.ZipFile(path) as archive:
        written_by = json.loads(archive.read("metadata.json"))["keras_version"]
    if _version(keras.__version__) < _version(written_by):
        pytest.skip(
            f"{name}.keras was written by Keras {written_by}; Keras "
            f"{keras.__version__} cannot read a newer version's files"
        )
    stored = np.load(os.path.join(FOLDER, f"{name}.npz"))
    return stored, keras.saving.load_model(
        os.path.join(FOLDER, f"{name}.keras")
    )


@pytest.mark.parametrize("name", NAMES)
def test_a_saved_distiller_of_release_0_1_loads(name):
    stored, restored = _load(name)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(
            restored.student(stored["x"], training=False)
        ),
        stored["predictions"],
        rtol=1e-5,
        atol=1e-6,
    )
    # Compared as sets of values: layer names count up within a process,
    # and the order of the variables is not part of the file. Random
    # generators' states are the backend's (uint32 on JAX, int64 on
    # TensorFlow), and an augmentation layer's is not in the file.
    saved = [
        stored[f"variable_{i}"]
        for i, path in enumerate(stored["paths"])
        if "seed_generator" not in path
    ]
    values = [
        keras.ops.convert_to_numpy(v.value)
        for v in restored.variables
        if "seed_generator" not in v.path
    ]
    assert sorted(map(_key, values)) == sorted(map(_key, saved))


# Training is the same code on both backends once loaded: one pass.
@ONCE
@pytest.mark.parametrize("name", NAMES)
def test_training_continues_after_loading(name):
    stored, restored = _load(name)
    x = stored["x"]
    if name in ("teachers", "self_teachers"):
        x = keras_selfdistill.data.with_sample_ids(x)
    y = np.arange(len(stored["x"])) % 3
    history = restored.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
