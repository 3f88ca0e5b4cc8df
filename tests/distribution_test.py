import json
import os
import subprocess
import sys

from absl.testing import parameterized

# TensorFlow must split the CPU into two logical devices before it starts,
# so the comparison runs in a fresh process.
_SCRIPT = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
import keras_selfdistill as ksd

rng = np.random.default_rng(0)
x = rng.normal(size=(32, 4)).astype("float32")
y = rng.integers(0, 3, size=32)
w = rng.uniform(0.0, 2.0, size=32).astype("float32")

def mlp(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)),
                             keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(3)])

def run(strategy, kind):
    with strategy.scope():
        teacher, student = mlp(1), mlp(2)
        if kind == "ema":
            teacher = ksd.teachers.EMA(momentum=0.8)
        distiller = ksd.Distiller(student, [
            ksd.terms.Distillation(teacher, temperature=2.0, weight=0.7)])
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(8)
    history = distiller.fit(data, epochs=2, verbose=0).history
    return history, [v.numpy().tolist() for v in distiller.variables]

result = {}
for kind in ("frozen", "ema"):
    result[kind] = {
        "one": run(tf.distribute.OneDeviceStrategy("/cpu:0"), kind),
        "two": run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
                   kind),
    }
json.dump(result, open(sys.argv[1], "w"))
"""


class MirroredStrategyTest(parameterized.TestCase):
    def test_two_replicas_match_one_device(self):
        out = os.path.join(self.create_tempdir().full_path, "out.json")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        subprocess.run(
            [sys.executable, "-c", _SCRIPT, out], check=True, env=env
        )
        with open(out) as file:
            results = json.load(file)
        for kind, result in results.items():
            (history_one, state_one), (history_two, state_two) = (
                result["one"],
                result["two"],
            )
            for key in ("loss", "distillation_loss"):
                for a, b in zip(history_one[key], history_two[key]):
                    self.assertAlmostEqual(a, b, places=5, msg=(kind, key))
            # Every variable: student, teacher (EMA weights), counters.
            self.assertEqual(len(state_one), len(state_two))
            for a, b in zip(state_one, state_two):
                for u, v in zip(_flatten(a), _flatten(b)):
                    self.assertAlmostEqual(u, v, places=5, msg=kind)


def _flatten(values):
    if isinstance(values, list):
        return [item for value in values for item in _flatten(value)]
    return [values]
