"""Tiny models and data shared by the tests."""

import keras
import numpy as np
import pytest

NUM_CLASSES = 3

# Backend-independent tests (scripts, files, subprocesses): run once, under
# the TensorFlow pass of the suite.
ONCE = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="backend-independent; runs in the TensorFlow pass",
)


# Tests run once, under the JAX pass, to balance the two that `make test`
# runs at once: notebook kernels (on TensorFlow, whichever pass
# starts them) and the language-model script.
IN_JAX_PASS = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="run once, in the JAX pass",
)


def data(n=24, features=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=n)
    return x, y


def mlp(hidden=8, features=4, classes=NUM_CLASSES, name=None, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(classes),
        ],
        name=name,
    )


def sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def kd(teacher_logits, student_logits, temperature):
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) per row, in float64."""
    p = softmax(np.float64(teacher_logits) / temperature)
    q = softmax(np.float64(student_logits) / temperature)
    return temperature**2 * np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def cnn(classes=NUM_CLASSES, name=None, seed=0):
    """A Functional CNN on 6×6×1 inputs with blocks 'b1', 'b2', 'b3'."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="b1")(
        inputs
    )
    h = keras.layers.Conv2D(6, 3, strides=2, activation="relu", name="b2")(h)
    h = keras.layers.Conv2D(8, 1, activation="relu", name="b3")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(inputs, keras.layers.Dense(classes, name="logits")(h))


def images(n=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 6, 1)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=n)
    return x, y


def predict_without_library(path, x, folder):
    """Loads a `.keras` file with `safe_mode=True` where the library cannot
    be imported, and returns its predictions on `x`."""
    import os
    import sys

    from tests import watchdog

    np.save(os.path.join(folder, "x.npy"), x)
    script = (
        "import sys; sys.modules['keras_selfdistill'] = None\n"
        "import numpy as np, keras\n"
        f"m = keras.saving.load_model({path!r}, safe_mode=True)\n"
        f"x = np.load({os.path.join(folder, 'x.npy')!r})\n"
        "np.save(sys.argv[1], m.predict(x, verbose=0))\n"
    )
    out = os.path.join(folder, "out.npy")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    watchdog.run(
        [sys.executable, "-c", script, out],
        check=True,
        env=env,
        cwd=folder,
        timeout=300,
    )
    return np.load(out)


def gradients(loss_fn, values):
    """Gradients of `loss_fn(dict of tensors)` w.r.t. each entry, as NumPy.

    A tensor the loss does not reach gets zeros (TensorFlow says `None`,
    JAX zeros).
    """
    if keras.backend.backend() == "jax":
        import jax

        grads = jax.grad(loss_fn)({k: np.asarray(v) for k, v in values.items()})
        return {k: np.asarray(g) for k, g in grads.items()}
    import tensorflow as tf

    variables = {k: tf.Variable(v) for k, v in values.items()}
    with tf.GradientTape() as tape:
        loss = loss_fn(variables)
    grads = tape.gradient(loss, variables)
    return {
        k: np.zeros_like(values[k]) if g is None else g.numpy()
        for k, g in grads.items()
    }


def gradient(function, x):
    """The gradient of the scalar `function(x)` with respect to `x`."""
    if keras.backend.backend() == "jax":
        import jax

        return np.asarray(jax.grad(function)(x))
    import tensorflow as tf

    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = function(x)
    return tape.gradient(value, x).numpy()


def language_model(vocabulary=11, length=6, name=None, seed=0):
    """Token ids `[batch, length]` to logits `[batch, length, vocabulary]`."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((length,), dtype="int32")
    h = keras.layers.Embedding(vocabulary, 6)(tokens)
    h = keras.layers.Dense(8, activation="relu")(h)
    return keras.Model(tokens, keras.layers.Dense(vocabulary)(h), name=name)


def fit_arguments(model, *args, **kwargs):
    """`model.fit(...)`'s History and the arguments Keras's `fit` received."""
    import functools
    from unittest import mock

    received = {}
    original = keras.Model.fit

    @functools.wraps(original)
    def spy(self, **arguments):
        received.update(arguments)
        return original(self, **arguments)

    kwargs.setdefault("verbose", 0)
    with mock.patch.object(keras.Model, "fit", spy):
        history = model.fit(*args, **kwargs)
    return history, received
