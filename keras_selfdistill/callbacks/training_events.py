import keras

NO_STEP = (
    "`fit` ran no training step: the training data yielded no batch. Check "
    "filters, `take`/`skip`, and `drop_remainder` with a batch size larger "
    "than the data."
)


class TrainingEvents(keras.callbacks.Callback):
    """Epoch counter and teacher hooks; fails a fit that ran no step.

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
        self.distiller.epoch.assign(epoch)

    def on_epoch_end(self, epoch, logs=None):
        if self.first_epoch and not logs:
            raise ValueError(NO_STEP)
        self.first_epoch = False
        for teacher in self.distiller.teachers:
            teacher.on_epoch_end(epoch)
