"""Every use of a private Keras, TensorFlow or JAX API, in one module.

Each is imported lazily or behind a guard: a release that moves one of
them degrades the one feature that needs it, with a message naming it,
instead of breaking `import keras_selfdistill`. `tests/internals_test.py`
fails when a private API is used anywhere else in the package.
"""

import contextlib

import keras

try:
    # Keras's monitor callbacks infer `mode="auto"` only for metrics grouped
    # in a MetricsList.
    from keras.src.trainers.compile_utils import MetricsList
except ImportError:  # pragma: no cover - depends on the Keras release

    class MetricsList(keras.layers.Layer):
        """Stand-in: `EarlyStopping` on a term metric then needs `mode=`."""

        def __init__(self, metrics, name="metrics_list", output_name=None):
            super().__init__(name=name)
            self.metrics = metrics

        def reset_state(self):
            for metric in self.metrics:
                metric.reset_state()

        def get_result(self):
            return {m.name: m.result() for m in self.metrics}


_UNSUPPORTED = (
    "keras_selfdistill needs `{name}` from Keras {version}, which this Keras "
    "release does not have. Install a Keras release in the range that "
    "setup.cfg declares."
)


def set_direction(metric, direction):
    """Tells Keras's monitor callbacks whether `metric` improves up or down."""
    metric._direction = direction


def _compiled(model, name):
    """`model.<name>`, a private attribute `compile` sets, or a clear error
    when this Keras release has none."""
    try:
        return getattr(model, name)
    except AttributeError as error:
        raise RuntimeError(
            _UNSUPPORTED.format(name=f"Model.{name}", version=keras.__version__)
        ) from error


def compiled_loss(model):
    """The loss `compile` built (Keras's `CompileLoss`), or `None`."""
    return _compiled(model, "_compile_loss")


def compiled_metrics(model):
    """The metrics `compile` built (Keras's `CompileMetrics`), or `None`."""
    return _compiled(model, "_compile_metrics")


# Keras saves a layer's own variables but not its seed generators' state:
# a run resumed from a backup would draw the first epochs' numbers again.
_SEED_STATE = "seed_generator_state"


def save_seed_state(layer, store):
    """Adds `layer.seed_generator`'s state to its saved variables."""
    generator = getattr(layer, "seed_generator", None)
    if generator is not None:
        store[_SEED_STATE] = generator.state


def load_with_seed_state(layer, store):
    """`Layer.load_own_variables`, plus the state `save_seed_state` added.

    Keras's own refuses a store with more entries than the layer's
    variables, so the variables are assigned here by their index, as
    Keras's saving numbers them.
    """
    own = layer._trainable_variables + layer._non_trainable_variables
    for i, variable in enumerate(own):
        variable.assign(store[f"{i}"])
    generator = getattr(layer, "seed_generator", None)
    if generator is not None and _SEED_STATE in store:
        generator.state.assign(store[_SEED_STATE])


def producing_operation(tensor):
    """The operation (layer) that produced a Functional model's tensor."""
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history.operation


def producing_call(tensor):
    """`(operation, positional arguments, keyword arguments)` of the call
    that produced a Functional model's tensor, or `None`.

    The call's own, where a layer is called more than once (a tied
    embedding is called on the token ids and, reversed, on the hidden
    states).
    """
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    try:
        node = history.operation._inbound_nodes[history.node_index]
        arguments = node.arguments
    except (AttributeError, IndexError):
        return None
    return history.operation, tuple(arguments.args), dict(arguments.kwargs)


def partition_spec(variable):
    """The mesh axes each axis of `variable` is split over (JAX, under a
    `keras.distribution`), or `None` when it is not split or unknown."""
    sharding = getattr(getattr(variable, "value", None), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return None
    axes = tuple(spec) + (None,) * (len(variable.shape) - len(spec))
    return None if all(a is None for a in axes) else axes


def built_input_shape(model):
    """The input shape a subclassed model was built with, or `None`."""
    shapes = getattr(model, "_build_shapes_dict", None) or {}
    shape = next(iter(shapes.values()), None)
    if shape is None or not isinstance(shape, (tuple, list)):
        return None
    if not all(isinstance(s, (int, type(None))) for s in shape):
        return None
    return tuple(shape)


def is_jax_tracer(value):
    """Whether `value` is an abstract JAX value inside a traced function."""
    import jax

    tracer = getattr(getattr(jax, "core", None), "Tracer", None)
    return tracer is not None and isinstance(value, tracer)


def dataset_batch_size(dataset):
    """The batch size tf.data reads from a dataset's last `batch`, or -1."""
    try:
        from tensorflow.python.data.experimental.ops import distribute
    except ImportError:  # pragma: no cover - depends on the TF release
        return -1
    return int(distribute.compute_batch_size(dataset))


def sync_training_state(model):
    """Writes a JAX `fit`'s in-flight state back into the model's variables.

    Keras's JAX trainer keeps the training state outside the variables
    during an epoch; a callback that reads or assigns a variable
    mid-epoch must first bring the variables up to date, and the next step
    then reads them back (so an assignment takes effect).
    """
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None and getattr(model, "_jax_state", None):
        sync()


def to_numpy(value):
    """A tensor's or variable's value as a NumPy array, with no warning.

    `keras.ops.convert_to_numpy` calls `np.array(x)`, and TensorFlow's
    tensors and variables lack NumPy 2's `__array__(copy=...)`: NumPy
    warns (DeprecationWarning) on every call. Their `.numpy()` does not.
    """
    import numpy as np

    if isinstance(value, keras.Variable):
        value = value.value
    if keras.backend.backend() == "tensorflow" and hasattr(value, "numpy"):
        return np.asarray(value.numpy())
    return keras.ops.convert_to_numpy(value)


def concrete_scalar(value):
    """`value` as a Python float when it is known now, else `None`.

    Known: a number, or a tensor outside any trace (TensorFlow eager, JAX
    without `jit`). Lets an eagerly run step branch in Python instead of
    building a `cond`, which eager JAX compiles anew on every call.
    """
    if isinstance(value, (int, float)):
        return float(value)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly():
            return None
    elif is_jax_tracer(value):
        return None
    return float(to_numpy(value))


def in_xla_function():
    """Whether TensorFlow traces a function compiled with XLA.

    `None` when this TensorFlow release does not say.
    """
    try:
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - depends on the TF release
        return None
    graph = tf.compat.v1.get_default_graph()
    return bool(control_flow_util.GraphOrParentsInXlaContext(graph))


def cached_decoder(model):
    """KerasHub's key/value-cache decoding of a causal LM, or `None`.

    `(build, step)`: `build(token_ids)` runs the model once over the
    sequences and returns `(hidden_states, cache)`, and `step(token_ids,
    cache, index)` runs the tokens at `index` against the cache and
    returns `(logits, hidden_states, cache)`. These are `_build_cache` and
    `call_with_cache`, which every KerasHub `CausalLM.generate_step` uses;
    the first is private, so a model without them decodes without a cache.
    """
    build = getattr(model, "_build_cache", None)
    step = getattr(model, "call_with_cache", None)
    if callable(build) and callable(step):
        return build, step
    return None


def run_stateless(model, state, function):
    """Runs `function()` on `model`'s variables as a JAX `state` holds them.

    Keras's JAX trainer passes each step its state as values, `(trainable,
    non_trainable, ...)`, outside the variables. Returns `(function's
    result, the non-trainable values after it)`: what `function` assigned
    (teachers' updates, seeds drawn) goes back into the state.
    """
    trainable, non_trainable = state[0], state[1]
    mapping = list(zip(model.trainable_variables, trainable)) + list(
        zip(model.non_trainable_variables, non_trainable)
    )
    with keras.StatelessScope(state_mapping=mapping) as scope:
        result = function()
    updated = []
    for variable, value in zip(model.non_trainable_variables, non_trainable):
        current = scope.get_current_value(variable)
        updated.append(value if current is None else current)
    return result, updated


def _inner_scope(overrides):
    """A `StatelessScope` that maps `overrides` and, for every other
    variable, what the enclosing scope maps (a nested scope of Keras's own
    would read those variables' stored values instead of the state's)."""
    from keras.src.backend.common.stateless_scope import get_stateless_scope

    outer = get_stateless_scope()
    scope = keras.StatelessScope(state_mapping=overrides)
    if outer is not None:
        inherited = dict(outer.state_mapping)
        inherited.update(scope.state_mapping)
        scope.state_mapping = inherited
    return scope


def minimize(optimizer, variables, loss_fn):
    """One step of `optimizer` on `variables` against `loss_fn()`.

    For models a term trains inside the training step (`Term.train_own`):
    the gradients of `loss_fn()` (scaled and unscaled by a
    `LossScaleOptimizer`) with respect to `variables`, applied by
    `optimizer`, on either backend. Under a `tf.distribute` strategy the
    optimizer sums the replicas' gradients, so `loss_fn` reduces as a term
    does. On JAX the step runs on the values of the enclosing
    `run_stateless`, and the new values are assigned there: `loss_fn` may
    read any variable but must not assign one (draw its random numbers
    before). Returns the loss.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        values = [v.value for v in variables]
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss = loss_fn()
            scaled = optimizer.scale_loss(loss)
        optimizer.apply(tape.gradient(scaled, values), variables)
        return loss
    if keras.backend.backend() != "jax":
        raise NotImplementedError(
            "A term that trains a model of its own runs on the TensorFlow "
            f"and JAX backends. Received: backend={keras.backend.backend()!r}"
        )
    import jax

    def scaled_loss(values):
        with _inner_scope(list(zip(variables, values))):
            loss = loss_fn()
            return optimizer.scale_loss(loss), loss

    values = [v.value for v in variables]
    gradients, loss = jax.grad(scaled_loss, has_aux=True)(values)
    new_values, new_slots = optimizer.stateless_apply(
        [v.value for v in optimizer.variables], gradients, values
    )
    for variable, value in zip(variables, new_values):
        variable.assign(value)
    for variable, value in zip(optimizer.variables, new_slots):
        variable.assign(value)
    return loss


def optimizer_step(model, optimizer_values):
    """The optimizer's step counter among a JAX state's optimizer values.

    Schedules read the step inside `compute_loss`, where Keras does not map
    the optimizer's variables to the state: the step is handed over while
    tracing instead.
    """
    variables = model.optimizer.variables
    iterations = model.optimizer.iterations
    position = next(i for i, v in enumerate(variables) if v is iterations)
    return optimizer_values[position]


def called_by_keras():
    """Whether the caller's caller is Keras's own code.

    Keras's `.keras` saving reads every attribute of a layer (`dir()`), a
    deprecated alias included: an alias that files of an earlier release
    need stays readable by it, and warns only when a user reads it.
    """
    import sys

    caller = sys._getframe(2).f_globals.get("__name__", "")
    return caller == "keras" or caller.startswith("keras.")


class _HistogramView:
    """What `keras.callbacks.TensorBoard._log_weights` reads of a model:
    `layers`, each with `weights`; here one holding `weights`."""

    def __init__(self, weights):
        self.weights = weights
        self.layers = [self]


def trained_histograms(callback):
    """Makes a `keras.callbacks.TensorBoard`'s weight histograms those of
    its model's `trained_weights` (a distiller's student and terms), not of
    every layer (the frozen teachers' unchanged copies included). Models
    without `trained_weights`, other callbacks and a TensorBoard without
    histograms are left as they are."""
    if not isinstance(callback, keras.callbacks.TensorBoard) or not getattr(
        callback, "histogram_freq", 0
    ):
        return
    if getattr(callback, "_ksd_log_weights", None) is not None:
        return
    original = callback._ksd_log_weights = callback._log_weights

    def log_weights(epoch):
        model = callback._model
        if not hasattr(model, "trained_weights"):
            return original(epoch)
        sync_training_state(model)
        callback._model = _HistogramView(model.trained_weights)
        try:
            return original(epoch)
        finally:
            callback._model = model

    callback._log_weights = log_weights


def trusted_deserialization():
    """A scope in which `from_config` rebuilds `Lambda` layers: for a copy
    of a model built in this process, whose code is already running.
    Where a release moved the scope, such a copy fails with Keras's own
    message about `Lambda` layers."""
    try:
        from keras.src.saving.serialization_lib import SafeModeScope
    except ImportError:  # pragma: no cover - depends on the Keras release
        return contextlib.nullcontext()
    return SafeModeScope(False)


def quantization_modes():
    """The quantisation modes this Keras release has (`int4` came in 3.11,
    GPTQ and AWQ later)."""
    try:
        from keras.src.dtype_policies import QUANTIZATION_MODES
    except ImportError:  # pragma: no cover - depends on the Keras release
        return ("int8", "float8")
    return tuple(QUANTIZATION_MODES)


def all_layers(model):
    """`model` and every layer in it, nested ones too (Keras's own walk)."""
    return list(model._flatten_layers(include_self=True, recursive=True))


def leaf_layers(model):
    """The layers of `model` that hold no other layer, nested ones too."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if not list(layer._flatten_layers(include_self=False))
    ]


def copy_variables(destinations, sources):
    """Assigns each source variable's value to its destination.

    Copies, so that no two variables share a buffer: JAX donates every
    variable's buffer to the training step, and one buffer donated twice
    fails the step.
    """
    for destination, source in zip(destinations, sources):
        destination.assign(keras.ops.copy(source.value))


def clone_uncompiled(model, **kwargs):
    """`keras.models.clone_model(model, **kwargs)`, never compiled.

    Keras compiles a clone of a compiled model with the original's compile
    config: the copy would carry an optimizer the caller did not choose,
    and saving it would write that optimizer's state, tripling an Adam
    student's file.
    """
    compiled = getattr(model, "compiled", False)
    model.compiled = False
    try:
        return keras.models.clone_model(model, **kwargs)
    finally:
        model.compiled = compiled
