"""Quantised students: a quantised copy to evaluate, or to distil into."""

import warnings

import keras

from keras_selfdistill import _arguments
from keras_selfdistill import _internals

# Keras's weight-only and dynamic modes that need no calibration data.
MODES = ("int8", "int4", "float8")
# Modes whose kernels are integers: they cannot take a gradient.
INTEGER_MODES = ("int8", "int4", "gptq", "awq")


def quantize(model, mode="int8", lora_rank=None, exclude=None):
    """A quantised copy of a model, optionally with LoRA adapters to train.

    Two uses. After a distillation, `quantize(student)` is the student as
    it will ship, to evaluate (accuracy, size on disk). And distillation
    *into* a quantised student, QLoRA-style (Dettmers et al., 2023): with
    `lora_rank`, every quantised layer gets LoRA adapters
    (`layer.enable_lora(lora_rank)`), and everything else is frozen: the
    integer kernels, their scales, biases and every layer Keras does not
    quantise. Only the adapters train, from a float teacher, typically the
    model the copy was made from.

    Keras quantises `Dense`, `EinsumDense`, `Embedding` and (KerasHub's)
    `ReversibleEmbedding` layers; convolutions, normalisations and custom
    layers stay float. The copy is made as saving and loading would make
    it (same classes, names and weights), so Functional, Sequential and
    KerasHub models are copied alike; the original is untouched, even where
    it is frozen as a teacher. Without `lora_rank` the quantised layers are
    frozen in the copy and the float layers stay trainable: a layer whose
    kernel is integers cannot train it, and `Distiller.fit` refuses a
    student with such a layer left trainable without adapters.

    An int8 KerasHub `ReversibleEmbedding` (a tied LM head, as GPT-2's
    and Gemma's) passes no gradient to its inputs when called in reverse:
    KerasHub (0.32, the newest release tested) quantises the inputs of the
    head's matmul with no straight-through gradient, so every weight below
    the head would train on a wrong gradient (measured: the loss rises).
    `Distiller.fit` refuses such a student; keep the embedding float
    (`exclude=["token_embedding"]`) or use int4, which is weight-only.

    Saving a LoRA layer stores its adapters merged into a re-quantised
    kernel (Keras's `save_own_variables`), and loading it sets both
    adapters to zero, where they receive no gradient: the saved student is
    the one to ship, but a run cannot resume from it, and `Distiller.fit`
    refuses `BackupAndRestore` with such a student.

    Reference:

    - [Dettmers et al., 2023](https://arxiv.org/abs/2305.14314) (QLoRA:
      frozen quantised weights, trained low-rank adapters)

    Args:
        model: A built `keras.Model` with no quantised or LoRA layer.
        mode: `"int8"` (per-channel weights, inputs quantised per token at
            run time), `"int4"` (weight-only; Keras 3.11 and later) or
            `"float8"` (float8 training). GPTQ and AWQ need calibration
            data and a layer structure: use `model.quantize` with their
            configs for them.
        lora_rank: The adapters' rank (a positive integer) for an integer
            `mode`, or `None` for no adapters.
        exclude: Names of layers to keep float (frozen with `lora_rank`,
            trainable without), or `None`. Defaults to `None`.

    Returns:
        The quantised copy, uncompiled.

    Example:

    ```python
    ksd = keras_selfdistill
    student = ksd.pruning.quantize(teacher, "int8", lora_rank=8)
    distiller = ksd.Distiller(student, [ksd.terms.Distillation(teacher)])
    distiller.compile(optimizer="adam")
    distiller.fit(x_train, y_train, epochs=2)
    ```
    """
    _check(model, mode, lora_rank)
    exclude = _excluded(model, exclude)
    copy = _copy(model)
    quantized = [
        layer
        for layer in _internals.leaf_layers(copy)
        if layer.name not in exclude and _quantized(layer, mode)
    ]
    if not quantized:
        names = [layer.name for layer in _internals.leaf_layers(model)]
        raise ValueError(
            f"{model.name!r} has no layer that Keras quantises in {mode} "
            "(`Dense`, `EinsumDense`, `Embedding`): its quantised copy would "
            f"equal it. Received: layers {names}"
        )
    # A fresh model to train, even where the original is frozen as a
    # teacher; every layer by itself (a Functional model's setter does not
    # reach every nested layer on every backend).
    for layer in _internals.all_layers(copy):
        layer.trainable = True
    if lora_rank is None:
        if mode in INTEGER_MODES:
            for layer in quantized:
                layer.trainable = False
        return copy
    for layer in _internals.leaf_layers(copy):
        if layer not in quantized:
            layer.trainable = False
    for layer in quantized:
        layer.enable_lora(lora_rank)
        for variable in layer.trainable_weights:
            if not variable.name.startswith("lora_"):
                variable.trainable = False
    return copy


def _check(model, mode, lora_rank):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`quantize` copies a `keras.Model`. Received: model={model!r}"
        )
    if mode not in MODES:
        raise ValueError(
            f"`mode` must be one of {MODES}; GPTQ and AWQ need calibration "
            "data: call `model.quantize` with their configs. Received: "
            f"mode={mode!r}"
        )
    if mode not in _internals.quantization_modes():
        raise ValueError(
            f"Keras {keras.__version__} has no {mode} quantisation (int4 "
            "came in Keras 3.11): upgrade Keras or use `mode='int8'`. "
            f"Received: mode={mode!r}"
        )
    if lora_rank is not None:
        if not _arguments.is_integer(lora_rank) or lora_rank < 1:
            raise ValueError(
                "`lora_rank` is the adapters' rank, a positive integer, or "
                f"`None`. Received: lora_rank={lora_rank!r}"
            )
        if mode not in INTEGER_MODES:
            raise ValueError(
                f"A {mode} layer trains its own kernel: LoRA adapters are "
                "for integer kernels (`mode='int8'` or `'int4'`). Received: "
                f"mode={mode!r}, lora_rank={lora_rank!r}"
            )
    if not model.built:
        raise ValueError(
            f"{model.name!r} is not built: call it on data (or build it) "
            "before quantising a copy. Received: an unbuilt model"
        )
    for layer in _internals.leaf_layers(model):
        if is_quantized(layer):
            raise ValueError(
                f"Layer {layer.name!r} of {model.name!r} is already "
                "quantised or has LoRA adapters: `quantize` copies a float "
                "model. Received: quantization_mode="
                f"{getattr(layer, 'quantization_mode', None)!r}, "
                f"lora_enabled={getattr(layer, 'lora_enabled', False)!r}"
            )


def _excluded(model, exclude):
    if exclude is None:
        return set()
    if isinstance(exclude, str) or not all(
        isinstance(name, str) for name in exclude
    ):
        raise TypeError(
            "`exclude` lists layer names, e.g. `['token_embedding']`. "
            f"Received: exclude={exclude!r}"
        )
    names = {layer.name for layer in _internals.leaf_layers(model)}
    unknown = sorted(set(exclude) - names)
    if unknown:
        raise ValueError(
            f"{model.name!r} has no layers {unknown} to keep float: "
            f"`exclude` names its layers ({sorted(names)}). Received: "
            f"exclude={list(exclude)!r}"
        )
    return set(exclude)


def _copy(model):
    """A copy of `model` as saving and loading would make it.

    Not `teachers.trainable_copy`: its `clone_model` rebuilds a KerasHub
    backbone as a plain Functional model, where `from_config` keeps the
    class. From the config alone, uncompiled: the original's optimizer is
    not the copy's.
    """
    with _internals.trusted_deserialization():
        copy = type(model).from_config(model.get_config())
    old, new = model.weights, copy.weights
    if [v.shape for v in old] != [v.shape for v in new]:
        raise ValueError(
            f"{model.name!r} does not rebuild from its config with the same "
            "weights (a subclassed model without `get_config`, or one built "
            "lazily): quantise it in place with `model.quantize` instead. "
            f"Received: {len(old)} weights, {len(new)} in the copy"
        )
    _internals.copy_variables(new, old)
    return copy


def _quantized(layer, mode):
    """Quantises `layer` in place where Keras can: whether it did."""
    if type(layer).quantize is keras.layers.Layer.quantize:
        return False
    try:
        with warnings.catch_warnings():
            # Keras's quantisers read the kernel variable with
            # `np.array(variable)`, which NumPy 2 flags on every call
            # (the variables lack `__array__(copy=...)`): harmless here.
            warnings.filterwarnings(
                "ignore",
                message="__array__ implementation doesn't accept a copy",
                category=DeprecationWarning,
            )
            layer.quantize(mode)
    except NotImplementedError:
        # A subclass of a quantisable layer, or a mode the layer lacks
        # (`model.quantize` skips these too).
        return False
    return True


def refuse_untrainable(student, callbacks):
    """Refuses, before training, a student whose integer kernels were left
    trainable without adapters (nothing would change them), a trainable
    student with an int8 KerasHub `ReversibleEmbedding` (its reverse call
    passes no gradient to its inputs), and a run resumable by
    `BackupAndRestore` whose student has LoRA adapters on integer kernels
    (loading merges and zeroes them)."""
    frozen = frozen_kernel_layers(student)
    if frozen:
        names = [layer.name for layer in frozen]
        raise ValueError(
            f"Layers {names} of the student are quantised "
            f"({frozen[0].quantization_mode}) and trainable, but an integer "
            "kernel takes no gradient: training would change only their "
            "biases. Distil into adapters (`keras_selfdistill.pruning."
            "quantize(model, mode, lora_rank=...)` or `layer.enable_lora`), "
            "freeze these layers (`layer.trainable = False`), or distil the "
            "float model and quantise after. Received: trainable integer "
            "kernels without LoRA"
        )
    heads = int8_reversible_embeddings(student)
    if heads and student.trainable_weights:
        raise ValueError(
            f"Layer {heads[0].name!r} of the student is an int8 KerasHub "
            "`ReversibleEmbedding`. Called in reverse (a language model's "
            "head), it quantises its inputs with no gradient through them, "
            "so every weight below it would train on a wrong gradient (the "
            "loss rises). Keep it float (`keras_selfdistill.pruning."
            "quantize(model, 'int8', lora_rank=..., "
            f"exclude=[{heads[0].name!r}])`) "
            "or use `mode='int4'` (weight-only). Received: a trainable "
            "student with an int8 `ReversibleEmbedding`"
        )
    adapted = quantized_lora_layers(student)
    backups = [
        c for c in callbacks if isinstance(c, keras.callbacks.BackupAndRestore)
    ]
    if adapted and backups:
        raise ValueError(
            f"Layers {[layer.name for layer in adapted]} of the student have "
            "LoRA adapters on integer kernels, and Keras saves them merged "
            "into a re-quantised kernel and loads them as zeros, where they "
            "take no gradient: a run restored by `BackupAndRestore` would "
            "stop training them. Save the student at the end instead (the "
            "merged file is the one to ship). Received: a `BackupAndRestore` "
            "callback"
        )


def is_quantized(layer):
    """Whether `layer` is quantised or has LoRA adapters."""
    return bool(
        getattr(layer, "quantization_mode", None)
        or getattr(layer, "lora_enabled", False)
    )


def frozen_kernel_layers(model):
    """The layers of `model` left trainable whose kernels are integers and
    have no LoRA adapters: training cannot change their kernels."""
    return [
        layer
        for layer in _internals.leaf_layers(model)
        if layer.trainable
        and getattr(layer, "quantization_mode", None) in INTEGER_MODES
        and not getattr(layer, "lora_enabled", False)
    ]


def quantized_lora_layers(model):
    """The layers of `model` with LoRA adapters on integer kernels."""
    return [
        layer
        for layer in _internals.leaf_layers(model)
        if getattr(layer, "quantization_mode", None) in INTEGER_MODES
        and getattr(layer, "lora_enabled", False)
    ]


def int8_reversible_embeddings(model):
    """The int8 KerasHub `ReversibleEmbedding` layers of `model` (by class
    name: KerasHub is optional)."""
    return [
        layer
        for layer in _internals.leaf_layers(model)
        if getattr(layer, "quantization_mode", None) == "int8"
        and any(
            c.__name__ == "ReversibleEmbedding" for c in type(layer).__mro__
        )
    ]
