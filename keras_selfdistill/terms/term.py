"""`Term`, the base of every piece of the distillation objective.

Its public contract (hyperparameters, reduction, the declared forward and
batch protocols, saving) is one idea, at about 500 lines with its
docstrings.
"""

import abc
import math
import re
import warnings
import weakref

import keras
from keras import ops

from keras_selfdistill import _arguments
from keras_selfdistill import _internals
from keras_selfdistill import schedules


class _PerSampleLoss(keras.losses.Loss):
    """Applies Keras's own reduction to values that are already per-sample."""

    def call(self, y_true, y_pred):
        return y_pred


def _replicas():
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def scale_for_distribution(value):
    """Divides a loss by the replica count, as Keras's own losses do."""
    replicas = _replicas()
    if replicas is not None and replicas > 1:
        value = value / float(replicas)
    return value


def replica_mean(value):
    """The mean of a scalar over `tf.distribute` replicas (JAX: as is).

    On JAX the step computes over the global batch already; under a
    TensorFlow strategy each replica sees its slice and this all-reduces.
    """
    replicas = _replicas()
    if replicas is None or replicas == 1:
        return value
    import tensorflow as tf

    return tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.MEAN, value
    )


def draw_for_global_batch(draw, shape):
    """`draw(shape)` of this replica's rows, the same on any device count.

    `draw` takes a shape whose first axis is the batch. Under a
    `tf.distribute` strategy each replica holds `1/N` of the global batch
    and the same seed: drawing `shape` on each would give every replica
    the same numbers, and other numbers than one device draws for the
    whole batch. Each replica draws for the global batch and keeps its
    own slice (replica `r` holds rows `r·b` to `(r + 1)·b` of an evenly
    split batch). On JAX the step holds the global batch already.
    """
    replicas = _replicas()
    if replicas is None or replicas == 1:
        return draw(shape)
    import tensorflow as tf

    local = shape[0]
    values = draw((local * replicas,) + tuple(shape[1:]))
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    return values[replica * local : (replica + 1) * local]


# Where a schedule that leaves a strict bound (a temperature > 0) is held
# in the step: finite, and no division by zero.
_STRICT_FLOOR = 1e-6


def _values_at(schedule, steps, epoch):
    """The schedule's values at `steps`: one call on all of them when it
    computes elementwise (the library's schedules, Keras's), else one per
    step."""
    if not steps:
        return []
    try:
        values = _internals.to_numpy(
            schedule(ops.convert_to_tensor(steps, "int32"), epoch)
        )
    except Exception:  # A schedule written for one step at a time.
        values = None
    if values is not None and values.shape == (len(steps),):
        return [float(v) for v in values]
    return [float(_internals.to_numpy(schedule(s, epoch))) for s in steps]


def hyperparameter_property(name, doc=None):
    """A term attribute reading and assigning hyperparameter `name`.

    Reads give the number (or the schedule); assignments go through
    `Term._set_hyperparameter`, which checks the value and updates the
    variable the compiled step reads.
    """
    return property(
        lambda term: term._get_hyperparameter(name),
        lambda term, value: term._set_hyperparameter(name, value),
        doc=doc,
    )


def _snake_case(name):
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


class _OptimizerState(keras.layers.Layer):
    """A term's own optimizer's variables among the distiller's.

    Keras lists a model's state from its layers' variables: held here,
    the optimizer's slots and step counter are in the distiller's
    non-trainable variables, which JAX's training state and
    `tf.distribute` carry. Saving is the optimizer's own (an attribute of
    the term): this layer writes nothing, so nothing is saved twice.
    """

    def __init__(self, optimizer, **kwargs):
        super().__init__(**kwargs)
        self.slots = list(optimizer.variables)
        self.built = True

    def save_own_variables(self, store):
        pass

    def load_own_variables(self, store):
        pass


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class Term(keras.layers.Layer, metaclass=abc.ABCMeta):
    """Base class for a piece of the distillation objective.

    A term compares the student's outputs with some target and returns a
    scalar loss reduced exactly as the compiled Keras loss is: weighted by
    `sample_weight`, summed, divided by the batch size and, under
    `tf.distribute`, by the number of replicas. The `Distiller` adds
    `weight · loss` to the supervised loss and reports the unweighted loss
    as the metric `<name>_loss`.

    Hyperparameters (`weight`, `xi`, a subclass's `temperature`) are a
    number or a `keras_selfdistill.schedules.Schedule`. A number is stored
    in a non-trainable variable, so a callback may change it between steps
    (`term.weight = 0.5`) and checkpoints carry it.

    The contract of a subclass:

    - it implements `compute_loss(x, y, y_pred, sample_weight, step,
      epoch)` and reduces its per-sample values with `self.reduce(values,
      sample_weight)`; a term whose teacher may have no target yet for
      some samples implements `compute_loss_and_mask` instead, which also
      returns a `(batch,)` mask of the samples it covers (with `xi` set,
      the others keep their label loss at full weight instead of `1 − ξ`);
    - its own hyperparameters (a number or a schedule) are made with
      `self.add_hyperparameter(name, value)`, read in the step with
      `self.hyperparameter(name, step, epoch)` and written to its config
      with `self.hyperparameter_config(name)`;
    - it declares what it needs as class attributes: `reads_forward`
      (with `taps`, `view`, `forward`), `rewrites_batch` (with
      `rewrite_batch`), `has_loss`, `reads_logits`, `evaluates`;
    - `get_config` returns its constructor's arguments and `from_config`
      deserializes its own nested objects (a teacher, a schedule through
      `keras_selfdistill.schedules.deserialize`) before calling the
      base's; the class is registered with
      `keras.saving.register_keras_serializable` so that a saved
      distiller loads.

    Args:
        weight: Number (at least 0) or schedule multiplying the term.
            Defaults to `1.0`.
        xi: Optional label weight ξ of the self-distillation papers. When
            set, the objective becomes `(1 − ξ) · supervised + ξ · weight ·
            term`: `ξ = 0` is plain supervised training, `ξ = 1` pure
            distillation, and `ξ > 1` gives the labels a negative weight,
            which Das & Sanghavi show helps under heavy label noise. At most
            one term of a distiller may set it. Defaults to `None` (the term
            is simply added).
        name: Name of the term and prefix of its metric. Defaults to the
            class name in snake case.
    """

    def __init__(self, weight=1.0, xi=None, name=None, **kwargs):
        kwargs.pop("dtype", None)
        super().__init__(
            name=name or _snake_case(type(self).__name__),
            dtype="float32",
            **kwargs,
        )
        self._hyperparameters = {}
        self._hyperparameter_bounds = {}
        self._reducer = _PerSampleLoss(name=self.name, dtype="float32")
        self.add_hyperparameter("weight", weight, minimum=0.0)
        if xi is not None:
            self.add_hyperparameter("xi", xi, minimum=0.0)
        self.built = True

    def add_hyperparameter(self, name, value, minimum=None, strict=False):
        """Makes hyperparameter `name` from a number or a schedule.

        A number is stored in a non-trainable variable (a callback may
        reassign it, checkpoints carry it); a schedule is called each
        step. Either is checked: finite and at least `minimum` (above it
        with `strict`). Read it with `hyperparameter(name, step, epoch)`;
        `hyperparameter_property(name)` makes it an attribute.
        """
        self._hyperparameter_bounds[name] = (minimum, strict)
        value = schedules.as_schedule(value)
        if isinstance(value, schedules.Schedule):
            low, _ = value.value_range()
            self._check_number(name, low, "a schedule whose lowest value")
            self._hyperparameters[name] = value
            return
        self._check_number(name, value, "")
        self._hyperparameters[name] = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(float(value)),
            trainable=False,
            name=name,
        )

    def _check_number(self, name, value, what):
        minimum, strict = self._hyperparameter_bounds[name]
        label = f"`{name}` of {type(self).__name__} {what}".rstrip()
        if not _arguments.is_number(value):
            raise TypeError(
                f"{label} must be a number or a "
                "`keras_selfdistill.schedules.Schedule`. "
                f"Received: {name}={value!r}"
            )
        if not math.isfinite(value):
            raise ValueError(
                f"{label} must be finite. Received: {name}={value}"
            )
        if minimum is not None and (
            value < minimum or (strict and value == minimum)
        ):
            relation = ">" if strict else ">="
            raise ValueError(
                f"{label} must be {relation} {minimum}. "
                f"Received: {name}={value}"
            )

    def _sync(self):
        # On JAX a `fit` keeps its state outside the variables mid-epoch: a
        # callback's read would see stale (or deleted) values and its
        # assignment would be overwritten.
        model = getattr(self, "_model", lambda: None)()
        if model is not None:
            _internals.sync_training_state(model)

    def _get_hyperparameter(self, name):
        self._sync()
        value = self._hyperparameters.get(name)
        if isinstance(value, keras.Variable):
            return float(_internals.to_numpy(value))
        return value

    def _set_hyperparameter(self, name, value):
        current = self._hyperparameters.get(name)
        if not isinstance(current, keras.Variable):
            raise TypeError(
                f"`{name}` of term '{self.name}' was created as "
                f"{type(current).__name__}; only hyperparameters created "
                "from a number can be reassigned (with a number) during "
                "training. Pass a schedule at construction instead. "
                f"Received: {name}={value!r}"
            )
        if isinstance(value, schedules.Schedule):
            raise TypeError(
                f"`{name}` of term '{self.name}' holds a number; a schedule "
                "cannot replace it after the train step was traced. Pass the "
                f"schedule at construction. Received: {name}={value!r}"
            )
        self._check_number(name, value, "")
        self._sync()
        current.assign(float(value))

    def hyperparameter(self, name, step, epoch):
        """Returns hyperparameter `name` as a float32 scalar tensor.

        A schedule's value is held to the hyperparameter's bound in the
        step (a weight at 0, a temperature just above 0), where a value
        beyond it would maximise the term or divide by zero; `fit` then
        stops at the end of the epoch with the step and the value
        (`check_schedules`).
        """
        value = self._hyperparameters[name]
        if isinstance(value, schedules.Schedule):
            value = ops.convert_to_tensor(value(step, epoch), "float32")
            if len(value.shape) != 0:
                raise ValueError(
                    f"The schedule for `{name}` of term '{self.name}' must "
                    f"return a scalar. Received: shape={value.shape}"
                )
            minimum, strict = self._hyperparameter_bounds[name]
            if minimum is None:
                return value
            return ops.maximum(
                value, minimum + (_STRICT_FLOOR if strict else 0)
            )
        return ops.convert_to_tensor(value, "float32")

    def check_schedules(self, steps, epoch):
        """Raises if a scheduled hyperparameter leaves its bounds.

        Evaluates each schedule at the optimizer `steps` of `epoch`; `fit`
        calls it at the end of every epoch with the epoch's steps (at most
        64 of them, evenly spaced, the first and last included).
        """
        for name in self.scheduled_hyperparameters:
            schedule = self._hyperparameters[name]
            values = _values_at(schedule, steps, epoch)
            for step, value in zip(steps, values):
                self._check_number(
                    name,
                    value,
                    f"(a schedule, held to its bound in the step) at "
                    f"optimizer step {step} of epoch {epoch}",
                )

    weight = hyperparameter_property("weight")

    @property
    def scheduled_hyperparameters(self):
        """Names of the hyperparameters given as schedules, in order."""
        return [
            name
            for name, value in self._hyperparameters.items()
            if isinstance(value, schedules.Schedule)
        ]

    @property
    def mixes_labels(self):
        """Whether the term rescales the supervised loss (`xi` is set)."""
        return "xi" in self._hyperparameters

    def mixing(self, step, epoch, mask):
        """Returns `(factor, label_scale)` for this step.

        The `Distiller` adds `weight · factor · loss` and multiplies the
        supervised loss by `label_scale` (a scalar, or per sample with
        `mask`), or leaves it alone when `label_scale` is `None`. With
        `xi`: `(ξ, 1 − ξ)`, and `1` for the samples outside `mask`.
        """
        if not self.mixes_labels:
            return 1.0, None
        xi = self.hyperparameter("xi", step, epoch)
        return xi, 1.0 - (xi if mask is None else xi * mask)

    xi = hyperparameter_property("xi")

    @property
    def teachers(self):
        """The teachers this term reads, updated after each step."""
        return []

    @property
    def follows_student(self):
        """Whether the term's target moves with the student.

        True when one of its teachers follows the student (past
        predictions, a moving average, snapshots). `fit` then refuses a
        callback that monitors the term's loss, which starts near 0 and
        grows as the two drift apart.
        """
        return any(t.follows_student for t in self.teachers)

    def attach(self, student):
        """Checks the term against the student; called by the `Distiller`."""

    def check_batch(self, x):
        """Checks the inputs of the first training batch, before any step.

        Called by `fit` (with `check_data`, the default) on the inputs of
        the first batch it can read without consuming the data, as
        `compute_loss` receives them: up to 32 rows of NumPy inputs, or a
        dataset's first element. Raise a `ValueError` for inputs the term
        cannot train on. Defaults to no check.
        """

    # The forward-pass protocol. A term that reads more than the student's
    # final output declares it here; the `Distiller` serves every such term
    # from the student's one call per step and hands it, as `y_pred`, a
    # dict with the logits under `"output"` and what the terms' `forward`
    # returned.

    @property
    def taps(self):
        """Names of the student's intermediate outputs the term reads.

        Layer names of a Functional or Sequential student (the layer's
        output), keys of a subclassed student's output dict, or
        `"deepest_features"` (the input of the student's output layer).
        Each is in the dict that `forward` receives, which returns what
        `compute_loss` needs of them. Defaults to `()`.
        """
        return ()

    def view(self, inputs, training=None):
        """A second view of the batch that the student also runs on.

        Returns a tensor (structure) like `inputs`, or `None` for no view.
        The student runs once on the batch and its views, concatenated;
        `forward` receives the outputs on this term's view under `"view"`,
        a dict like its own. Defaults to `None`.
        """
        return None

    def forward(self, outputs, training=None):
        """Tensors the term's own layers compute inside the forward pass.

        `outputs` holds the student's logits (`"output"`), the term's
        taps and, with a view, `"view"`. Layers called here (exit heads,
        projectors) run in the model's call, so their losses are
        minimised and `distiller(x)` returns what they produce. Returns a
        dict whose keys no other term uses; `compute_loss` finds it in
        `y_pred`, beside `"output"`. Defaults to `{}`.
        """
        return {}

    #: Whether the term reads the forward pass's dict (`taps`, `view`,
    #: `forward`) as its `y_pred`, instead of the student's logits. A term
    #: that declares taps, a view or layers of its own sets it.
    reads_forward = False

    #: Whether the term computes the student's output layer itself, from
    #: its taps (a loss fused with a language model's head, which never
    #: builds all the logits). In the training step the student's forward
    #: then stops at the taps: `y_pred` has no `"output"`, no compiled
    #: loss or metric may read the logits, and the `Distiller` calls
    #: `compute_objective` instead of `compute_loss_and_mask`. At most one
    #: term of a distiller sets it.
    computes_output = False

    @property
    def supervises(self):
        """Whether `compute_objective` also returns the label loss.

        A term that computes the student's output layer and the label
        loss with it sets it; the `Distiller` reports that loss as
        `supervised_loss`. Defaults to `False`.
        """
        return False

    def compute_objective(self, x, y, y_pred, sample_weight, step, epoch):
        """Returns `(objective, loss, supervised)` for one batch.

        Called instead of `compute_loss_and_mask` for a term that
        `computes_output`: `objective` is what the step minimises, the
        term's weight and any label loss included; `loss` the term's own
        unweighted loss, for its `<name>_loss` metric; `supervised` the
        label loss that `objective` holds, or `None`. A term that sets
        `computes_output` without it is refused when the `Distiller` is
        built; the base is never called for one that does not.
        """
        raise NotImplementedError(
            f"Term '{self.name}' sets `computes_output = True` and must "
            "implement `compute_objective`."
        )

    @property
    def output_key(self):
        """Key of the logits in a subclassed student's output dict."""
        return None

    def update_metrics(self, y, y_pred, sample_weight):
        """Updates the term's own metrics; runs in training and validation.

        `y_pred` is what `compute_loss` receives. The term's metrics are
        Keras metrics held as its attributes, shown in the progress bar
        and History; at validation only those named in
        `validation_metrics` are reported.
        """

    @property
    def validation_metrics(self):
        """Names of the term's metrics that validation also reports."""
        return ()

    @property
    def exports(self):
        """Models the `Distiller` publishes as attributes of the same name.

        For instance `AuxiliaryExits` publishes its student with heads as
        `distiller.exits`. Defaults to `{}`.
        """
        return {}

    # The batch protocol. A term that replaces the training batch before
    # the step (samples generated by the student or a teacher) declares it
    # here; the `Distiller` runs it with the model's current weights.

    @property
    def has_loss(self):
        """Whether the term adds a loss (and a `<name>_loss` metric)."""
        return True

    def rewrite_batch(self, x, y, sample_weight):
        """The batch the training step uses instead of `(x, y, weights)`.

        Runs in the training step only, with the student's current
        weights; `evaluate` keeps the data as given. Returns the triple
        unchanged by default.
        """
        return x, y, sample_weight

    #: Whether the `Distiller` runs the term's `rewrite_batch` before
    #: each training step. At most one term of a distiller sets it.
    rewrites_batch = False

    # The own-models protocol. A term that trains a network of its own in
    # the step (a fake-score model, a discriminator) declares it here; the
    # `Distiller` runs `train_own` before the student's update, and the
    # models and their optimizers are saved, resumed and replicated with
    # the distiller.

    #: Whether the `Distiller` calls `train_own` before each training step
    #: (after `rewrite_batch`).
    trains_own = False

    #: Names of the scalars `train_own` returns, each logged (an epoch's
    #: mean, weighted by batch size) as `<term name>_<name>` in the
    #: progress bar and History.
    own_metrics = ()

    def train_own(self, student, x, y, sample_weight):
        """Updates the term's own models, before the student's update.

        Runs in the training step only, on the batch as `rewrite_batch`
        left it, with the student's current weights (call it with
        `training=False`: its update is the step's own). Each update is a
        `self.minimize(optimizer, variables, loss_fn)` with an optimizer
        from `add_optimizer`; draw random numbers from the term's seed
        generator outside `loss_fn`. Returns a dict of the scalars named in
        `own_metrics` (losses reduced as `reduce` does), or `None`.
        Defaults to nothing.
        """

    def add_optimizer(self, optimizer, variables):
        """Makes `optimizer` the term's own, for `variables`; returns it.

        Call it in `attach`, under the strategy scope the distiller is
        built in. The variables leave the student's optimizer (they are
        marked non-trainable: `keras.Model.trainable_variables` of the
        distiller, and of their model, no longer lists them; their layers
        still run in training mode). The optimizer is built on them, wrapped
        in a `keras.optimizers.LossScaleOptimizer` under `mixed_float16`
        as `compile` wraps the student's, and its state is tracked by the
        term, so that JAX's training state, `tf.distribute` and resumed
        runs carry it. Hold the returned optimizer as an attribute of the
        term: Keras saves it (and its state) with the distiller.
        """
        optimizer = keras.optimizers.get(optimizer)
        if keras.config.dtype_policy().name == "mixed_float16" and not (
            isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        ):
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        variables = list(variables)
        optimizer.build(variables)
        for variable in variables:
            variable.trainable = False
        holder = _OptimizerState(optimizer, name=f"{optimizer.name}_state")
        self._own_optimizer_states = [
            *getattr(self, "_own_optimizer_states", []),
            holder,
        ]
        return optimizer

    def minimize(self, optimizer, variables, loss_fn):
        """One update of `variables` by `optimizer` (from `add_optimizer`)
        against `loss_fn()`, inside `train_own`, on either backend and
        under `tf.distribute` (`loss_fn` reduces as `reduce` does: the
        replicas' gradients are summed). Returns the loss."""
        return _internals.minimize(optimizer, variables, loss_fn)

    @property
    def reads_logits(self):
        """Whether the student's outputs are logits to this term.

        `fit` checks on the first batch that the student does not return
        probabilities only when every term reads logits; a term whose
        student outputs something else (a diffusion model's velocity) says
        `False`. Defaults to `True`.
        """
        return True

    @property
    def evaluates(self):
        """Whether `evaluate` can run the student on the data as given.

        `False` for a term whose student only runs on the batch it
        rewrites (noisy images and their times): `evaluate` and
        `validation_data` are then refused. Defaults to `True`.
        """
        return True

    def _bind(self, model):
        # A weak reference: the model owns the term, and saving walks
        # attributes, which must not lead back to the model.
        object.__setattr__(self, "_model", weakref.ref(model))

    @abc.abstractmethod
    def compute_loss(self, x, y, y_pred, sample_weight, step, epoch):
        """Returns the term's scalar loss for one batch.

        Args:
            x: The batch's inputs, as given to `fit`.
            y: The labels, or `None` for label-free distillation.
            y_pred: The student's outputs from the training forward pass.
            sample_weight: Per-sample weights or `None`.
            step: The optimizer's step counter.
            epoch: The current epoch.
        """

    def compute_loss_and_mask(self, x, y, y_pred, sample_weight, step, epoch):
        """Returns `(loss, mask)`; the `Distiller` calls this one.

        `mask` is a float32 `(batch,)` tensor, 1 for the samples the term
        has a target for, or `None` when it covers every sample. Defaults
        to `(compute_loss(...), None)`.
        """
        loss = self.compute_loss(x, y, y_pred, sample_weight, step, epoch)
        return loss, None

    def reduce(self, values, sample_weight):
        """The term's loss from its per-sample `values`, as Keras reduces.

        Weighted by `sample_weight` (a `(batch,)` weight, or one per
        position of a sequence), summed and divided by the batch size and,
        under `tf.distribute`, by the number of replicas: exactly as the
        compiled Keras loss is.
        """
        return self._reducer(values, values, sample_weight)

    def _reduce(self, values, sample_weight):
        warnings.warn(
            "`Term._reduce` is deprecated and will be removed in the next "
            "release: call `Term.reduce`.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.reduce(values, sample_weight)

    def _add_hyperparameter(self, name, value, minimum=None, strict=False):
        warnings.warn(
            "`Term._add_hyperparameter` is deprecated and will be removed in "
            "the next release: call `Term.add_hyperparameter`.",
            DeprecationWarning,
            stacklevel=2,
        )
        self.add_hyperparameter(name, value, minimum, strict)

    def save_own_variables(self, store):
        super().save_own_variables(store)
        _internals.save_seed_state(self, store)

    def load_own_variables(self, store):
        _internals.load_with_seed_state(self, store)

    def hyperparameter_config(self, name):
        """Hyperparameter `name` as `get_config` writes it.

        The number, or the schedule's config, which
        `keras_selfdistill.schedules.deserialize` reads back; `None` when
        the term has no such hyperparameter.
        """
        value = self._hyperparameters.get(name)
        if isinstance(value, schedules.Schedule):
            return keras.saving.serialize_keras_object(value)
        return self._get_hyperparameter(name)

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.pop("trainable", None)
        config["weight"] = self.hyperparameter_config("weight")
        config["xi"] = self.hyperparameter_config("xi")
        return config

    @classmethod
    def from_config(cls, config):
        """The term from `get_config`'s dict.

        Deserializes the base's `weight` and `xi`; a subclass deserializes
        its own nested objects first, then calls this.
        """
        config = dict(config)
        for name in ("weight", "xi"):
            if isinstance(config.get(name), dict):
                config[name] = schedules.deserialize(config[name])
        return cls(**config)
