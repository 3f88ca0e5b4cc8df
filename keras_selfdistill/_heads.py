"""The linear output layer (an LM head) of a Functional model.

A loss fused with the head (`keras_selfdistill.terms.FusedDistillation`)
projects the hidden states itself, a chunk at a time, so it needs the
head as a matrix: a `Dense` layer without activation, or a
`ReversibleEmbedding` called in reverse (KerasHub's causal LMs: tied to
the token embedding, as Gemma's, or with a reverse matrix of its own).
"""

import keras
from keras import ops

from keras_selfdistill import _forward
from keras_selfdistill import _internals


class Head:
    """A model's output layer as `logits = hidden @ kernel (+ bias)`.

    Attributes:
        layer: The output layer.
        kernel: The variable of shape `(width, vocabulary)`, or
            `(vocabulary, width)` when `transposed` (a tied embedding).
        bias: The bias variable or `None`.
        transposed: Whether `kernel` is `(vocabulary, width)`.
        width: The hidden states' width.
        vocabulary: The number of logits.
    """

    def __init__(self, layer, kernel, bias, transposed):
        self.layer = layer
        self.kernel = kernel
        self.bias = bias
        self.transposed = transposed
        shape = tuple(kernel.shape)
        self.width, self.vocabulary = shape[::-1] if transposed else shape

    @property
    def trainable(self):
        return self.layer.trainable and self.kernel.trainable

    @property
    def vocabulary_axis(self):
        """The axis of `kernel` that holds the vocabulary."""
        return 0 if self.transposed else 1

    def vocabulary_split(self):
        """The mesh axes the vocabulary is split over, or `None`."""
        spec = _internals.partition_spec(self.kernel)
        return None if spec is None else spec[self.vocabulary_axis]

    def describe(self):
        kind = "tied embedding" if self.transposed else "matrix"
        return (
            f"'{self.layer.name}' ({type(self.layer).__name__}, {kind} of "
            f"shape {tuple(self.kernel.shape)})"
        )


def project(hidden, kernel, bias=None, transposed=False):
    """float32 logits `hidden @ kernel (+ bias)` (`kernel` transposed)."""
    hidden = ops.cast(hidden, "float32")
    kernel = ops.cast(kernel, "float32")
    if transposed:
        # An einsum, not a transpose: the gradient with respect to a
        # `(vocabulary, width)` kernel is then one product, not a product
        # and a kernel-sized transpose.
        logits = ops.einsum("nw,vw->nv", hidden, kernel)
    else:
        logits = ops.matmul(hidden, kernel)
    if bias is not None:
        logits = logits + ops.cast(bias, "float32")
    return logits


def output_head(model, role):
    """The `Head` of a Functional model's one output, or a clear error."""
    if not _forward.is_graph(model):
        raise ValueError(
            f"A loss fused with the {role}'s output layer reads the head of "
            "a Functional model (KerasHub's causal LMs are), but "
            f"'{model.name}' is subclassed: its head cannot be found. "
            "Build it as a Functional model. Received: "
            f"{type(model).__name__}"
        )
    if len(model.outputs) != 1:
        raise ValueError(
            f"A loss fused with the {role}'s output layer needs a model with "
            f"one output; '{model.name}' has {len(model.outputs)}. "
            f"Received: output shapes {[tuple(o.shape) for o in model.outputs]}"
        )
    call = _internals.producing_call(model.outputs[0])
    layer = _internals.producing_operation(model.outputs[0])
    return head_of(layer, call[2] if call else {}, role)


def head_of(layer, call_kwargs, role):
    """The `Head` of `layer` as called with `call_kwargs`."""
    name = getattr(layer, "name", layer)
    if getattr(layer, "quantization_mode", None):
        raise ValueError(
            f"The {role}'s output layer '{name}' is quantized "
            f"({layer.quantization_mode}); the fused loss projects with a "
            "float matrix. Distil into the float model and quantize after. "
            f"Received: quantization_mode={layer.quantization_mode!r}"
        )
    # `keras.layers.ReversibleEmbedding` (Keras 3.11 and later) or
    # KerasHub's own before it: an embedding with `tie_weights`.
    reversible = isinstance(layer, keras.layers.Embedding) and hasattr(
        layer, "tie_weights"
    )
    if reversible and call_kwargs.get("reverse"):
        cap = getattr(layer, "logit_soft_cap", None)
        if cap is not None:
            raise ValueError(
                f"The {role}'s output layer '{name}' caps its logits "
                f"(logit_soft_cap={cap}), which a linear "
                "head does not: the fused loss would differ from the "
                "model's. Use `FusedDistillation` with models without a "
                "soft cap, or `Distillation`. Received: "
                f"logit_soft_cap={cap}"
            )
        if layer.tie_weights:
            return Head(layer, layer.embeddings, None, transposed=True)
        return Head(layer, layer.reverse_embeddings, None, transposed=False)
    if isinstance(layer, keras.layers.Dense):
        activation = keras.activations.serialize(layer.activation)
        if activation not in ("linear", None):
            raise ValueError(
                f"The {role}'s output layer '{name}' has the activation "
                f"{activation!r}; a fused loss reads logits, so the head "
                "must be linear. Remove the activation. Received: "
                f"activation={activation!r}"
            )
        return Head(layer, layer.kernel, layer.bias, transposed=False)
    raise ValueError(
        f"The {role}'s output layer '{name}' ({type(layer).__name__}) is not "
        "a matrix the fused loss can project with: it reads a `Dense` "
        "layer without activation or a `ReversibleEmbedding` called with "
        "`reverse=True` (a KerasHub causal LM's head). A factorised, "
        "bias-only or otherwise transformed head has no such matrix: use "
        "`keras_selfdistill.terms.Distillation`, which reads the logits. "
        f"Received: an output layer of type {type(layer).__name__}"
    )
