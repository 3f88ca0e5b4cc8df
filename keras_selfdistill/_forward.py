"""The student's forward pass, extended with what the terms declare.

Internal: the `Distiller` builds one `Forward` from its terms. A term
declares, through `Term.taps`, `Term.view` and `Term.forward`, which
intermediate outputs of the student it reads, which second view of the
batch the student also sees, and which tensors its own layers (exit heads,
projectors) compute from them. The student still runs once per step: a
second view is concatenated to the batch, and every tap of every term
comes from that one call.
"""

import keras
from keras import ops

from keras_selfdistill import _internals

OUTPUT = "output"
#: The tap naming the input of the student's output layer: the features
#: its classifier reads.
DEEPEST_FEATURES = "deepest_features"
#: The key under which a term with a view finds the student's outputs on
#: it (a dict with `OUTPUT` and the term's taps).
VIEW = "view"


def is_graph(model):
    """Whether `model` is Functional or Sequential (its layers can be cut)."""
    try:
        return bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        return False


def graph_input(model):
    """A graph model's input structure, to build models that share it.

    A Sequential model keeps its input in the Functional model it builds;
    its `input` property fails before the model is called.
    """
    try:
        return model.input
    except (AttributeError, ValueError):
        inputs = model.inputs
        return inputs[0] if len(inputs) == 1 else inputs


def _ordered_union(lists):
    names = []
    for items in lists:
        names += [n for n in items if n not in names]
    return names


class Forward:
    """Runs the student once and every term's forward extension."""

    def __init__(self, student, terms, output_key=OUTPUT):
        self.student = student
        self.terms = [t for t in terms if t.reads_forward]
        self.taps = _ordered_union(t.taps for t in self.terms)
        self.output_key = output_key
        self.tapped = None
        if self.taps and is_graph(student):
            self.tapped = keras.Model(
                graph_input(student), self._graph_outputs(), name="tapped"
            )
        # A term that computes the output layer itself: the training
        # forward stops at the taps, and the output layer does not run.
        self.headless = None
        if any(t.computes_output for t in self.terms):
            if self.tapped is None:
                raise ValueError(
                    "A term that computes the student's output layer "
                    "itself reads the hidden states of a Functional "
                    f"student; '{student.name}' is subclassed. Build it as "
                    "a Functional model. Received: "
                    f"{type(student).__name__}"
                )
            self.headless = keras.Model(
                graph_input(student),
                graph_taps(student, self.taps),
                name="headless",
            )

    @property
    def extended(self):
        """Whether the forward returns a dict rather than the logits."""
        return bool(self.terms)

    def _graph_outputs(self):
        student = self.student
        if len(student.outputs) != 1:
            raise ValueError(
                f"Terms that read intermediate outputs ({self.taps}) need a "
                f"student with one output; '{student.name}' has "
                f"{len(student.outputs)}. Received: output shapes "
                f"{[tuple(o.shape) for o in student.outputs]}"
            )
        outputs = {OUTPUT: student.outputs[0]}
        outputs.update(graph_taps(student, self.taps))
        return outputs

    def _run(self, inputs, training):
        """The student's logits and taps for `inputs`, from one call."""
        if self.headless is not None and training:
            return self.headless(inputs, training=training)
        if self.tapped is not None:
            return self.tapped(inputs, training=training)
        outputs = self.student(inputs, training=training)
        if not self.taps:
            if isinstance(outputs, dict):
                outputs = self._logits(outputs)
            return {OUTPUT: outputs}
        if not isinstance(outputs, dict):
            raise ValueError(
                f"The subclassed student '{self.student.name}' must return a "
                f"dict with its logits under '{self.output_key}' and the "
                f"tensors the terms read under {self.taps}. Received: "
                f"outputs of type {type(outputs).__name__}"
            )
        missing = [k for k in [self.output_key] + self.taps if k not in outputs]
        if missing:
            raise ValueError(
                f"The subclassed student '{self.student.name}' returned no "
                f"{missing}, which the terms read. Received: keys "
                f"{sorted(outputs)}"
            )
        result = {name: outputs[name] for name in self.taps}
        result[OUTPUT] = outputs[self.output_key]
        return result

    def _logits(self, outputs):
        if self.output_key not in outputs:
            raise ValueError(
                f"The student '{self.student.name}' returns a dict without "
                f"its logits under '{self.output_key}'. Received: keys "
                f"{sorted(outputs)}"
            )
        return outputs[self.output_key]

    def __call__(self, inputs, training=None):
        if not self.terms:
            return self.student(inputs, training=training)
        views = []
        for term in self.terms:
            view = term.view(inputs, training=training)
            if view is not None:
                views.append((term, view))
        batch = inputs
        if views:
            batch = keras.tree.map_structure(
                lambda *parts: ops.concatenate(parts, axis=0),
                inputs,
                *[view for _, view in views],
            )
        outputs = self._run(batch, training)
        by_term = {}
        if views:
            size = ops.shape(keras.tree.flatten(inputs)[0])[0]
            pieces = {
                key: [
                    value[i * size : (i + 1) * size]
                    for i in range(len(views) + 1)
                ]
                for key, value in outputs.items()
            }
            outputs = {key: parts[0] for key, parts in pieces.items()}
            for index, (term, _) in enumerate(views, start=1):
                by_term[id(term)] = {
                    key: parts[index] for key, parts in pieces.items()
                }
        result = {OUTPUT: outputs[OUTPUT]} if OUTPUT in outputs else {}
        owners = {OUTPUT: "the student"}
        for term in self.terms:
            given = dict(outputs)
            if id(term) in by_term:
                given[VIEW] = by_term[id(term)]
            extra = term.forward(given, training=training)
            for key, value in extra.items():
                if key in owners:
                    raise ValueError(
                        f"Term '{term.name}' puts an output under '{key}', "
                        f"which {owners[key]} already uses. Give the terms "
                        f"distinct names or layers. Received: key={key!r}"
                    )
                owners[key] = f"term '{term.name}'"
                result[key] = value
        return result

    def final(self, inputs, training=None):
        """The student's logits alone: no tap, view or head runs."""
        outputs = self.student(inputs, training=training)
        if isinstance(outputs, dict):
            return self._logits(outputs)
        return outputs


def graph_taps(model, names):
    """`{name: tensor}`: the named outputs in a Functional model's graph."""
    valid = [
        layer.name
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    ]
    taps = {}
    for name in names:
        if name == DEEPEST_FEATURES:
            taps[name] = _classifier_input(model, model.outputs[0])
            continue
        if name not in valid:
            raise ValueError(
                f"The model '{model.name}' has no layer named '{name}'. "
                f"Valid names: {valid} and '{DEEPEST_FEATURES}' (the input "
                f"of the output layer). Received: {name!r}"
            )
        tapped = model.get_layer(name).output
        if isinstance(tapped, (list, tuple, dict)):
            raise ValueError(
                f"Layer '{name}' of '{model.name}' has several outputs; tap "
                f"a layer with one. Received: {len(tapped)} outputs"
            )
        taps[name] = tapped
    return taps


def tap_shapes(model, names):
    """`{name: shape}` of the named outputs, batch axis first (`None`).

    A Functional model's from its graph; a subclassed model returning a
    dict from a symbolic call on the input shape it was built with.
    """
    if is_graph(model):
        return {k: tuple(v.shape) for k, v in graph_taps(model, names).items()}
    shape = _internals.built_input_shape(model)
    if shape is None:
        raise ValueError(
            f"The shapes of '{model.name}''s outputs {names} are needed "
            "before training, but the subclassed model has not been built. "
            "Call it once on a batch (`model(x[:1])`) or `model.build("
            "input_shape)` first. Received: an unbuilt model"
        )
    spec = model.compute_output_spec(keras.KerasTensor((None,) + shape[1:]))
    missing = [n for n in names if not isinstance(spec, dict) or n not in spec]
    if missing:
        raise ValueError(
            f"The subclassed model '{model.name}' must return a dict holding "
            f"{missing}. Received: outputs "
            f"{sorted(spec) if isinstance(spec, dict) else type(spec).__name__}"
        )
    return {name: tuple(spec[name].shape) for name in names}


def _classifier_input(student, output):
    call = _internals.producing_call(output)
    final = _internals.producing_operation(output)
    inputs = None
    if call is not None and len(call[1]) == 1:
        # The input of this call (a layer called twice, as a tied
        # embedding is, has one per call).
        inputs = call[1][0]
    elif call is None:
        inputs = getattr(final, "input", None)
    if not hasattr(inputs, "shape"):
        raise ValueError(
            f"The tap '{DEEPEST_FEATURES}' is the input of the student's "
            f"output layer '{getattr(final, 'name', final)}', which must be "
            f"one tensor. Received: {type(inputs).__name__}"
        )
    return inputs
