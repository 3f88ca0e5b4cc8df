"""Trains one configuration for 4 epochs; run as a script.

`python -m tests.resume_run MODE FOLDER KIND [KIND ...]`. MODE `full`
trains without interruption; `kill` trains with
`keras.callbacks.BackupAndRestore` and SIGKILLs its own process in the
middle of epoch 3 (after batch 2), so it takes one KIND; `resume` restarts
from that backup. `full` and `resume` write every variable.
"""

import os
import signal
import sys

import keras
import numpy as np

import keras_selfdistill as ksd
from tests import distributed_run


class _Kill(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if self._epoch == 2 and batch == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch


def main(mode, folder, *kinds):
    for kind in kinds:
        _train(mode, kind, folder)


def _train(mode, kind, folder):
    distiller = distributed_run.distiller(keras, ksd, kind)
    callbacks = []
    if mode != "full":
        callbacks.append(
            keras.callbacks.BackupAndRestore(
                os.path.join(folder, f"backup_{kind}"), delete_checkpoint=False
            )
        )
    if mode == "kill":
        callbacks.append(_Kill())
    data = distributed_run.data(ksd, kind)
    history = distiller.fit(data, epochs=4, verbose=0, callbacks=callbacks)
    state = {"epochs_run": np.asarray(len(history.epoch))}
    state |= {
        f"v{i}": keras.ops.convert_to_numpy(v)
        for i, v in enumerate(distiller.variables)
    }
    np.savez(os.path.join(folder, f"{mode}_{kind}.npz"), **state)


if __name__ == "__main__":
    from tests import watchdog

    watchdog.arm()
    main(*sys.argv[1:])
