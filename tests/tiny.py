"""Tiny models and data shared by the tests."""

import keras
import numpy as np

NUM_CLASSES = 3


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
