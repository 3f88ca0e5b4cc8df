import os
import subprocess
import sys

import numpy as np
from absl.testing import parameterized

# Each mode runs in its own process, as a restarted job would: "full" trains
# 4 epochs, "interrupt" stops at the start of epoch 3 with a backup, and
# "resume" restarts from the backup in a fresh process.
_SCRIPT = r"""
import sys
import keras
import numpy as np
import keras_selfdistill as ksd

mode, folder = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
x = rng.normal(size=(24, 4)).astype("float32")
y = rng.integers(0, 3, size=24)

def teachers():
    return {
        "past_predictions": ksd.terms.Distillation(
            ksd.teachers.PastPredictions(24, 3, dtype="float32"),
            xi=ksd.schedules.LinearRampUp(ramp_up_epochs=3, end=0.8)),
        "ema": ksd.terms.Distillation(
            ksd.teachers.EMA(momentum=0.7),
            weight=ksd.schedules.SigmoidRampUp(ramp_up_steps=10)),
        "snapshot": ksd.terms.Distillation(
            ksd.teachers.Snapshot(keep=2, combine="vote"), temperature=2.0),
    }

class Stop(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise KeyboardInterrupt

for name, term in teachers().items():
    keras.utils.set_random_seed(1)
    student = keras.Sequential([keras.Input((4,)),
                                keras.layers.Dense(8, activation="relu"),
                                keras.layers.Dense(3)])
    distiller = ksd.Distiller(student, [term])
    distiller.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    inputs = ksd.data.with_sample_ids(x)
    callbacks = []
    if mode != "full":
        callbacks.append(keras.callbacks.BackupAndRestore(
            f"{folder}/backup_{name}", delete_checkpoint=False))
    if mode == "interrupt":
        callbacks.append(Stop())
    try:
        distiller.fit(inputs, y, batch_size=5, epochs=4, shuffle=False,
                      verbose=0, callbacks=callbacks)
    except KeyboardInterrupt:
        continue
    state = {f"v{i}": v.numpy() for i, v in enumerate(distiller.variables)}
    np.savez(f"{folder}/{mode}_{name}.npz", **state)
"""


class ResumeTest(parameterized.TestCase):
    def test_resumed_runs_match_uninterrupted_ones(self):
        folder = self.create_tempdir().full_path
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        for mode in ("full", "interrupt", "resume"):
            subprocess.run(
                [sys.executable, "-c", _SCRIPT, mode, folder],
                check=True,
                env=env,
            )
        for name in ("past_predictions", "ema", "snapshot"):
            full = np.load(os.path.join(folder, f"full_{name}.npz"))
            resumed = np.load(os.path.join(folder, f"resume_{name}.npz"))
            self.assertEqual(sorted(full), sorted(resumed))
            for key in full:
                np.testing.assert_allclose(
                    resumed[key], full[key], atol=1e-6, err_msg=name
                )
