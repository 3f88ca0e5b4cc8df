import keras

from keras_selfdistill import _internals

NO_STEP = (
    "`fit` ran no training step: the training data yielded no batch. Check "
    "filters, `take`/`skip`, and `drop_remainder` with a batch size larger "
    "than the data."
)


class TrainingEvents(keras.callbacks.Callback):
    """Epoch counter and teacher hooks; fails a fit that ran no step.

    The distiller's epoch counter counts the epochs it has trained, across
    `fit` calls and in saved files, as the optimizer's `iterations` counts
    steps: `fit(epochs=1)` in a loop, or a loaded distiller trained on
    without `initial_epoch`, goes on from where it stopped. A larger
    `initial_epoch` moves it forward (Keras's own numbering); it never
    moves back.

    Keras only warns ("Your input ran out of data") when a dataset of
    unknown size turns out empty, and returns an empty History as if it had
    trained; an epoch that ran a step always logs at least `loss`.
    """

    def __init__(self, distiller):
        super().__init__()
        self.distiller = distiller

    def on_train_begin(self, logs=None):
        self.first_epoch = True
        for teacher in self.distiller.teachers:
            teacher.on_train_begin()

    def on_epoch_begin(self, epoch, logs=None):
        counted = max(int(_internals.to_numpy(self.distiller.epoch)), epoch)
        self.distiller.epoch.assign(counted)
        for teacher in self.distiller.teachers:
            teacher.on_epoch_begin(counted)

    def on_epoch_end(self, epoch, logs=None):
        if self.first_epoch and not logs:
            raise ValueError(NO_STEP)
        self.first_epoch = False
        counted = int(_internals.to_numpy(self.distiller.epoch))
        for teacher in self.distiller.teachers:
            teacher.on_epoch_end(counted)
        # Counted as done before BackupAndRestore or ModelCheckpoint save
        # it (this callback runs first), so a restart resumes after it.
        self.distiller.epoch.assign(counted + 1)
