import abc

import keras
from keras import ops

from keras_selfdistill import _internals
from keras_selfdistill import targets as ksd_targets
from keras_selfdistill._forward import graph_input
from keras_selfdistill._forward import graph_taps
from keras_selfdistill._forward import is_graph
from keras_selfdistill._forward import tap_shapes
from keras_selfdistill._internals import copy_variables
from keras_selfdistill.batch import select_input

_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")


def final_activation(model):
    """`"softmax"` or `"sigmoid"` when `model`'s single output ends in one.

    Reads the layer that produces the output: a `Softmax` layer, or a layer
    whose `activation` is softmax or sigmoid (the default head of every
    `keras.applications` model). `None` otherwise or when unknown.
    """
    if isinstance(model, keras.Sequential) and model.layers:
        layer = model.layers[-1]
    else:
        try:
            outputs = model.outputs
        except (AttributeError, ValueError):
            return None
        if not isinstance(outputs, (list, tuple)) or len(outputs) != 1:
            return None
        layer = _internals.producing_operation(outputs[0])
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    name = getattr(getattr(layer, "activation", None), "__name__", None)
    return name if name in _PROBABILITY_ACTIVATIONS else None


_PROBABILITY_FIXES = {
    "student": "and compile with `from_logits=True` losses",
    "teacher": "or pass `FrozenModel(model, from_logits=False)`",
}


def refuse_probabilities(role, model_name, activation):
    """Raises the error for a `role` model whose outputs are probabilities."""
    raise ValueError(
        f"The {role} '{model_name}' ends in a {activation}, so its outputs "
        "are probabilities, but distillation reads logits (a softmax of "
        "probabilities gives near-uniform targets and a wrong loss). Build "
        "it without the final activation (`classifier_activation=None` for "
        "`keras.applications` models, `activation=None` on the last Dense) "
        f"{_PROBABILITY_FIXES[role]}. Received: outputs that are "
        f"{activation} probabilities"
    )


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
    `attach(student)` once, `targets(x, y_pred, temperature)` inside the
    training loss, `update(data)` after every optimizer step, and
    `on_train_begin()` / `on_epoch_end(epoch)` from `fit`. Teachers never
    run during `evaluate` or `predict`.

    A teacher may have no target yet for some samples (a prediction bank
    before a sample's first visit, snapshots before the first one is
    taken). Such a teacher overrides `targets_and_mask`, which also returns
    a per-sample mask of the samples it has a target for; a term then
    leaves those samples out of its loss and trains them on their label at
    full weight, as PS-KD's official code does in its first epoch (past
    predictions are the one-hot labels there).

    Subclasses implement `targets` (and `targets_and_mask` when targets can
    be missing), declare their `target_kind` (`"logits"`, the default, or
    `"log_probs"` for a mixture; `keras_selfdistill.targets` has the
    contract and the one mixture every teacher uses), and the hooks when
    they hold state that follows the student.

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

    #: Whether the teacher reads `x["sample_id"]`; such a teacher has a
    #: `num_samples` and `fit` checks the ids against it.
    keyed_by_id = False

    #: Whether the teacher writes a row per sample id in the training step
    #: (a prediction bank): the ids of a batch must then be distinct.
    writes_by_id = False

    #: Whether `fit` joins rows of this teacher to the training batch in
    #: the input pipeline (outputs cached on disk); such a class implements
    #: `join_rows` and `pipeline_error`.
    joins_rows = False

    @property
    def rows_follow_epoch(self):
        """Whether the joined rows depend on the epoch (augmented views).

        The pipeline then joins them in every epoch, not only the first.
        Defaults to `False`.
        """
        return False

    @classmethod
    def join_rows(cls, teachers, x, given, keep_ids, later):
        """The training data `x` with the rows of `teachers` joined.

        Called by `fit` for the teachers of this class that declare
        `joins_rows`, last in the input pipeline. `given` is the object
        the user passed to `fit`; `keep_ids` whether a teacher that is not
        joined reads the sample ids in the step. With `later` (a dataset
        that `fit` reads after a first, checked pass of `x`), returns the
        pair `(x, later)`, both joined. Defaults to the data unchanged.
        """
        return x if later is None else (x, later)

    @staticmethod
    def pipeline_error(error):
        """The message of this class's pipeline check that `error` wraps.

        Checks in the `tf.data` pipeline reach `fit` wrapped in
        TensorFlow's errors; `fit` raises the check's own message instead.
        Defaults to `None` (no such check).
        """
        return None

    @property
    def metrics(self):
        # A teacher model compiled for its own training carries metrics
        # named "loss" and "accuracy"; listed here they would shadow the
        # distiller's own in the logs.
        return []

    def attach(self, student):
        """Checks the teacher against the student before training."""

    #: What `targets` returns (`keras_selfdistill.targets`): `"logits"`,
    #: whose softmax at the term's temperature is the target, or
    #: `"log_probs"`, the target's log-probabilities at the temperature
    #: `targets` is given (a mixture), which no loss divides again.
    target_kind = ksd_targets.LOGITS

    @abc.abstractmethod
    def targets(self, x, y_pred, temperature):
        """Returns the teacher's targets for the batch, without gradient.

        `x` are the batch inputs and `y_pred` the student's outputs of the
        same training forward pass. The targets are of the declared
        `target_kind`: logits `z`, whose target is `softmax(z / T)`, or
        the target's log-probabilities at `temperature`.
        """

    def targets_and_mask(self, x, y_pred, temperature):
        """Returns `(targets, mask)`: targets and which samples have one.

        `mask` is a float32 tensor of shape `(batch,)`, 1 where the teacher
        has a target for the sample and 0 where it has none yet (the
        targets of such a row are then meaningless), or `None` when every
        sample has a target. Defaults to `(targets(...), None)`.
        """
        return self.targets(x, y_pred, temperature), None

    @property
    def returns_model_outputs(self):
        """Whether `targets` are a model's outputs as it returns them.

        `fit` then checks on the first batch that they are not
        probabilities (rows that are non-negative and sum to 1). Defaults
        to `False`.
        """
        return False

    #: Whether the targets follow the student during training (EMA,
    #: snapshots, past predictions): a loss against them is not a measure of
    #: progress, so no callback may monitor it.
    follows_student = False

    def walk(self):
        """This teacher and every teacher it holds, depth first.

        The `Distiller` calls the hooks (`update`, `on_train_begin`,
        `on_epoch_begin`, `on_epoch_end`) and the data checks on each of
        them, so a teacher that holds teachers does not forward its hooks.
        """
        return [self]

    def update(self, data):
        """Called after each optimizer step with the training batch."""

    def on_train_begin(self):
        """Called eagerly when `fit` starts."""

    def on_epoch_begin(self, epoch):
        """Called eagerly at the start of each training epoch.

        `epoch` counts the distiller's trained epochs (across `fit` calls
        and restarts), from 0.
        """

    def on_epoch_end(self, epoch):
        """Called eagerly at the end of each training epoch."""

    def _logits(self, model, x):
        """`model`'s inference-mode logits for the batch, without gradient."""
        inputs = select_input(x, self.input_key, f"Teacher '{self.name}'")
        logits = model(inputs, training=False)
        if not hasattr(logits, "shape"):
            raise ValueError(
                f"Teacher '{model.name}' must return a single logits "
                f"tensor. Received: outputs of type {type(logits).__name__}"
            )
        return ops.stop_gradient(logits)

    def feature_models(self):
        """The models whose intermediate outputs are this teacher's features.

        Feature terms (`keras_selfdistill.terms.FeatureDistillation`) read
        a layer of each and average them. Defaults to `[]`: a teacher
        without models (a prediction bank, an ensemble) has no features.
        """
        return []

    def feature_shape(self, layer_name):
        """The shape of the features at `layer_name`, batch axis `None`."""
        models = self._models_with_features(layer_name)
        return tap_shapes(models[0], [layer_name])[layer_name]

    def features_and_mask(self, x, layer_name):
        """Returns `(features, mask)` for the batch, without gradient.

        The mean over `feature_models()` of their layer `layer_name`'s
        output in inference mode; `mask` as in `targets_and_mask`.
        """
        inputs = select_input(x, self.input_key, f"Teacher '{self.name}'")
        values = [
            ops.cast(self._tapped(model, layer_name)(inputs), "float32")
            for model in self._models_with_features(layer_name)
        ]
        mean = values[0]
        for value in values[1:]:
            mean = mean + value
        return ops.stop_gradient(mean / float(len(values))), None

    def _models_with_features(self, layer_name):
        models = self.feature_models()
        if not models:
            raise TypeError(
                f"The {type(self).__name__} teacher '{self.name}' holds no "
                f"model whose layer '{layer_name}' could be read. Feature "
                "distillation needs a FrozenModel, EMA, Snapshot or "
                "RandomInit teacher. Received: "
                f"teacher={type(self).__name__}"
            )
        return models

    def _tapped(self, model, layer_name):
        """A callable giving `model`'s output at `layer_name`, built once."""
        cache = self.__dict__.setdefault("_tapped_models", {})
        key = (id(model), layer_name)
        if key not in cache:
            if is_graph(model):
                tapped = keras.Model(
                    graph_input(model),
                    graph_taps(model, [layer_name])[layer_name],
                    name=f"{model.name}_{layer_name}",
                )
                cache[key] = lambda inputs: tapped(inputs, training=False)
            else:
                cache[key] = lambda inputs: model(inputs, training=False)[
                    layer_name
                ]
        return cache[key]

    def _follow(self, student):
        """Keeps the student for teachers that copy it.

        Returns `False` when the teacher already follows this student (the
        terms that share it each attach it): `attach` has nothing left to
        do. Another student is refused.
        """
        current = getattr(self, "_student", None)
        if current is student:
            return False
        if current is not None:
            raise ValueError(
                f"The {type(self).__name__} teacher '{self.name}' already "
                f"follows a student, '{current.name}'; create one per "
                "distiller (terms of one distiller may share it). Received: "
                f"another student, '{student.name}'"
            )
        # Not tracked as a sublayer: the distiller saves the student.
        object.__setattr__(self, "_student", student)
        return True

    def save_own_variables(self, store):
        super().save_own_variables(store)
        _internals.save_seed_state(self, store)

    def load_own_variables(self, store):
        _internals.load_with_seed_state(self, store)

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.pop("trainable", None)
        config["input_key"] = self.input_key
        return config


def clone_student(student, owner, copy_weights=True):
    """A frozen copy of the student's architecture, for self-teachers."""
    if not student.built or not student.variables:
        raise ValueError(
            f"{owner} copies the student's weights, but the student "
            f"'{student.name}' is not built yet (a subclassed model gets its "
            "weights on its first call), so the copy would start from other "
            "random weights. Build it first: `student.build(input_shape)` or "
            "`student(x[:1])`. Received: a student with no variables"
        )
    try:
        clone = _internals.clone_uncompiled(student)
    except Exception as error:
        raise ValueError(
            f"{owner} copies the student's architecture with "
            "`keras.models.clone_model`, which failed for this student. "
            "Use a Functional or Sequential student, or give the subclassed "
            "student `get_config`/`from_config`. "
            f"Received: {type(error).__name__}: {error}"
        ) from error
    if copy_weights:
        copy_variables(clone.variables, student.variables)
    clone.trainable = False
    return clone


def trainable_copy(model):
    """A copy of `model` with its weights, every layer and weight trainable.

    A `FrozenModel` teacher sets its model's `trainable` to `False` in
    place. A `keras.models.clone_model` of it made afterwards is frozen
    too, and on the TensorFlow backend stays frozen after `trainable =
    True` (its weights were created non-trainable): a student or a
    generator initialised from the teacher would silently not train. This
    copy builds every layer from its config with `trainable=True` and
    copies the weights. It is uncompiled, as a fresh model is, even where
    the original is compiled.

    Example:

    ```python
    term = keras_selfdistill.terms.ConsistencyDistillation(base_model)
    # base_model is frozen now; a student that starts from it:
    student = keras_selfdistill.diffusion.trainable_copy(base_model)
    ```
    """

    def trainable_layer(layer):
        config = layer.get_config()
        if "trainable" in config:
            config["trainable"] = True
        return layer.__class__.from_config(config)

    copy = _internals.clone_uncompiled(model, clone_function=trainable_layer)
    # Variable to variable: `get_weights` converts each to NumPy, which
    # warns under NumPy 2 on JAX.
    copy_variables(copy.weights, model.weights)
    return copy
