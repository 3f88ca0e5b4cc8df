import math

import keras
import numpy as np

from keras_selfdistill import _internals

NO_STEP = (
    "`fit` ran no training step: the training data yielded no batch. Check "
    "filters, `take`/`skip`, and `drop_remainder` with a batch size larger "
    "than the data."
)


class TrainingEvents(keras.callbacks.Callback):
    """Epoch counter and teacher hooks; fails a fit that ran no step, or an
    epoch with a non-finite loss or a schedule out of its range.

    The distiller's epoch counter counts the epochs it has trained, across
    `fit` calls and in saved files, as the optimizer's `iterations` counts
    steps: `fit(epochs=1)` in a loop, or a loaded distiller trained on
    without `initial_epoch`, goes on from where it stopped. A larger
    `initial_epoch` moves it forward (Keras's own numbering); it never
    moves back.

    Keras only warns ("Your input ran out of data") when a dataset of
    unknown size turns out empty, and returns an empty History as if it had
    trained; an epoch that ran a step always logs at least `loss`.

    At the end of every epoch, before any checkpoint of it is written, a
    non-finite training loss stops `fit` (the data are checked in the
    first epoch only when a pass of them is known; a NaN input or a
    diverged step later would otherwise go on training NaN weights), and
    so does a scheduled hyperparameter that left its range during the
    epoch (the step held it to its bound: `Term.hyperparameter`).
    """

    def __init__(self, distiller):
        super().__init__()
        self.distiller = distiller

    def on_train_begin(self, logs=None):
        self.first_epoch = True
        # Reading the optimizer's step syncs a JAX fit's state: only for
        # terms with schedules to check.
        self.scheduled = any(
            term.scheduled_hyperparameters for term in self.distiller.terms
        )
        for teacher in self.distiller.teachers:
            teacher.on_train_begin()

    def on_epoch_begin(self, epoch, logs=None):
        self.first_step = self._steps() if self.scheduled else 0
        counted = max(int(_internals.to_numpy(self.distiller.epoch)), epoch)
        self.distiller.epoch.assign(counted)
        for teacher in self.distiller.teachers:
            teacher.on_epoch_begin(counted)

    def _steps(self):
        """The optimizer's completed updates."""
        _internals.sync_training_state(self.distiller)
        optimizer = self.distiller.optimizer
        return (
            0
            if optimizer is None
            else int(_internals.to_numpy(optimizer.iterations))
        )

    def on_epoch_end(self, epoch, logs=None):
        if self.first_epoch and not logs:
            raise ValueError(NO_STEP)
        self.first_epoch = False
        counted = int(_internals.to_numpy(self.distiller.epoch))
        if self.distiller.check_data:
            _check_losses(logs or {}, counted)
        if self.scheduled:
            steps = _sampled(self.first_step, self._steps())
            for term in self.distiller.terms:
                term.check_schedules(steps, counted)
        for teacher in self.distiller.teachers:
            teacher.on_epoch_end(counted)
        # Counted as done before BackupAndRestore or ModelCheckpoint save
        # it (this callback runs first), so a restart resumes after it.
        self.distiller.epoch.assign(counted + 1)


def _sampled(first, end, count=64):
    """Up to `count` steps of `[first, end)`, evenly spaced, both ends in."""
    if end <= first:
        return []
    if end - first <= count:
        return list(range(first, end))
    spaced = np.linspace(first, end - 1, count).round().astype(int)
    return sorted({int(step) for step in spaced})


def _check_losses(logs, epoch):
    """Raises if a training loss of the epoch's logs is not finite."""
    losses = {
        name: value
        for name, value in logs.items()
        if not name.startswith("val_")
        and (name == "loss" or name.endswith("_loss"))
    }
    bad = {
        name: float(value)
        for name, value in losses.items()
        if not math.isfinite(float(value))
    }
    if bad:
        raise ValueError(
            f"The training loss was not finite in epoch {epoch}: {bad}. The "
            "weights may now hold NaN or infinity; restore them from a "
            "checkpoint written before this epoch (`BackupAndRestore`, "
            "`ModelCheckpoint`). Usual causes: a non-finite input that only "
            "later epochs of the pipeline yield (the data are checked in "
            "the first epoch), a learning rate too large, a schedule "
            f"reaching an edge. Received: logs {losses}"
        )
