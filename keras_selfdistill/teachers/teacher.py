import abc

import keras


def select_input(x, input_key, owner):
    """Returns `x[input_key]`, or `x` itself when `input_key` is `None`."""
    if input_key is None:
        return x
    if not isinstance(x, dict) or input_key not in x:
        keys = sorted(x) if isinstance(x, dict) else None
        raise ValueError(
            f"{owner} reads the input under key '{input_key}', but the batch "
            f"inputs {'have keys ' + str(keys) if keys else 'are not a dict'}"
            ". Give each model its own key in the inputs, e.g. "
            "`x = {'student': ..., 'teacher': ...}`, or set the right "
            f"`input_key`. Received: input_key={input_key!r}"
        )
    return x[input_key]


def num_classes(model):
    """The size of a model's last output axis, or `None` if unknown."""
    try:
        shape = model.output_shape
    except (AttributeError, ValueError, RuntimeError):
        return None
    if not isinstance(shape, tuple) or not shape:
        return None
    if not all(isinstance(size, (int, type(None))) for size in shape):
        return None
    return shape[-1]


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class Teacher(keras.layers.Layer, metaclass=abc.ABCMeta):
    """Base class for a source of soft targets.

    A teacher is a Keras layer that owns its state (a frozen model, moving
    weights, a bank of past predictions) as variables, so checkpoints and
    `keras.callbacks.BackupAndRestore` carry it. The `Distiller` calls
    `attach(student)` once, `targets(x, temperature)` inside the training
    loss and `update(data)` after every optimizer step. Teachers never run
    during `evaluate` or `predict`.

    Subclasses implement `targets`, and `update` when they hold state that
    follows the student.

    Args:
        input_key: Key of the teacher's input when the batch inputs are a
            dict holding several inputs (privileged information: the
            teacher sees context the student does not). Defaults to `None`
            (the teacher reads the same inputs as the student).
        name: Name of the layer. Defaults to the class name.
    """

    def __init__(self, input_key=None, name=None, **kwargs):
        kwargs.pop("dtype", None)
        super().__init__(name=name, dtype="float32", **kwargs)
        if input_key is not None and not isinstance(input_key, str):
            raise TypeError(
                f"`input_key` of {type(self).__name__} must be a string key "
                f"of the batch inputs. Received: input_key={input_key!r}"
            )
        self.input_key = input_key
        self.built = True

    @property
    def metrics(self):
        # A teacher model compiled for its own training carries metrics
        # named "loss" and "accuracy"; listed here they would shadow the
        # distiller's own in the logs.
        return []

    def attach(self, student):
        """Checks the teacher against the student before training."""

    @abc.abstractmethod
    def targets(self, x, temperature):
        """Returns teacher logits for inputs `x`, without gradient.

        The returned `z` is such that `softmax(z / temperature)` is the
        target distribution; teachers that mix several distributions return
        `temperature · log(mixture)`.
        """

    def update(self, data):
        """Called after each optimizer step with the training batch."""

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.pop("trainable", None)
        config["input_key"] = self.input_key
        return config
