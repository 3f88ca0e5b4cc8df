import keras


class StudentCheckpoint(keras.callbacks.ModelCheckpoint):
    """`keras.callbacks.ModelCheckpoint` for the deployable model.

    Saves the distiller's student alone, a plain Keras model that loads
    without this library (`keras.saving.load_model(path,
    safe_mode=True)`), with every option of `ModelCheckpoint`: `monitor`
    and `save_best_only` (the distiller's logs, `val_loss` included),
    `save_weights_only` (the student's weights), `save_freq`, and
    `{epoch}`-style file names. Given a model that has no `student`, it
    saves that model, as `ModelCheckpoint` does. `ModelCheckpoint` itself
    saves the whole distiller (teachers and optimizer too), which
    resumes training; this one keeps what is deployed.

    Args:
        filepath: Where to save: a name ending in `.keras`, or in
            `.weights.h5` with `save_weights_only=True`.
        **kwargs: `ModelCheckpoint`'s other arguments.

    Example:

    ```python
    best = keras_selfdistill.callbacks.StudentCheckpoint(
        "student-best.keras", monitor="val_accuracy", save_best_only=True)
    distiller.fit(x, y, validation_data=(x_val, y_val), epochs=20,
                  callbacks=[best])
    student = keras.saving.load_model("student-best.keras")
    ```
    """

    # Spelled out so that the documentation shows the signature.
    def __init__(self, filepath, **kwargs):
        super().__init__(filepath, **kwargs)

    @property
    def model(self):
        # Keras brings a JAX fit's state into the variables on this read.
        model = super().model
        return getattr(model, "student", model)
