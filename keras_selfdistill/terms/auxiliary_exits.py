import warnings

import keras
from keras import ops

from keras_selfdistill import _internals
from keras_selfdistill import ops as ksd_ops
from keras_selfdistill import schedules
from keras_selfdistill import targets as ksd_targets
from keras_selfdistill._forward import DEEPEST_FEATURES
from keras_selfdistill._forward import OUTPUT
from keras_selfdistill._term_metrics import ExitAccuracy
from keras_selfdistill.exits import exits as exits_module
from keras_selfdistill.terms.term import Term
from keras_selfdistill.terms.term import hyperparameter_property

_DIRECTIONS = ("deep_to_shallow", "shallow_to_deep")


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class AuxiliaryExits(Term):
    """Deep supervision: exits learn from the labels and the deepest exit.

    Be Your Own Teacher (BYOT): heads on intermediate layers (see
    `keras_selfdistill.exits.attach_exits`) are trained, for each exit `i`,
    with

    `w_i · [(1 − ξ) · CE(y, exit_i) + ξ · T² · KL(final/T ‖ exit_i/T)
    + feature_weight · ‖P_i(f_i) − f_final‖² / d]`

    where the student's own output is the teacher (stop-gradient: the KD
    part never moves the final head), `f_i` is the exit's globally pooled
    feature map, `f_final` the pooled input of the student's output layer,
    `P_i` a learnable linear projection when their widths differ, and `d`
    the width of `f_final`. The compiled loss still trains the final head,
    at weight 1 by default (deep supervision: the final classifier learns
    as it would alone). BYOT's own objective sums `(1 − α)·CE + α·KL` over
    every classifier, the deepest included, whose KL to itself is 0: its
    cross-entropy then weighs `1 − α`. `scale_final_label=True` gives
    exactly that objective. BYOT's `α` is the label weight `ξ` of the
    other terms (`xi`, which was called `alpha` here before). All exits
    come from the student's one forward pass.

    `direction="shallow_to_deep"` reverses the teaching, for ambiguous
    labels (lower layers teaching the final head): every exit learns from
    the labels alone, and the final head gets `ξ · T² · KL(m/T ‖ final/T)`
    towards the detached mean `m` of the exits' tempered probabilities.

    Each exit's accuracy is a metric `<exit name>_accuracy` (also at
    validation), and the term's loss is `auxiliary_exits_loss`. The trained
    model with its heads is `distiller.exits`; `distiller.student` stays
    the plain student.

    References:

    - [Zhang et al., 2019](https://arxiv.org/abs/1905.08094) (BYOT)
    - [Lee et al., 2015](https://arxiv.org/abs/1409.5185) (deeply
      supervised nets)

    Args:
        exits: Names of the student's layers to put an exit on, shallowest
            first, or an `Exits` model from `attach_exits` (to choose the
            heads yourself).
        weight: Number, schedule, or a list of them with one per exit.
            Defaults to `1.0`.
        temperature: Softmax temperature `T > 0` of the KL part (number or
            schedule). Defaults to `3.0` (BYOT).
        xi: Share `ξ` of the KL part against the label part, in `[0, 1]`
            (number or schedule); BYOT's `α`. `alpha=` is its deprecated
            name. Defaults to `0.5`.
        feature_weight: Weight of the feature hint (number or schedule);
            `0` builds no hint. Defaults to `0.0`.
        head: Head for exits given by name: `None`, `"linear"`,
            `"bottleneck"` or a factory (see `attach_exits`). Defaults to
            `None` (`"linear"`).
        direction: `"deep_to_shallow"` (BYOT) or `"shallow_to_deep"`.
            Defaults to `"deep_to_shallow"`.
        scale_final_label: Whether the compiled (final head's) loss is
            weighted by `1 − ξ`, as in the BYOT paper. Defaults to `False`
            (weight 1).
        name: Defaults to `"auxiliary_exits"`.

    Example:

    ```python
    ksd = keras_selfdistill
    distiller = ksd.Distiller(student, [ksd.terms.AuxiliaryExits(
        ["block1", "block2", "block3"], weight=0.5, head="bottleneck")])
    distiller.compile("adam", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), metrics=["accuracy"])
    distiller.fit(x_train, y_train, epochs=20)   # block1_accuracy, ...
    early = ksd.exits.EarlyExit(distiller.exits, threshold=0.9)
    ```
    """

    reads_forward = True

    def __init__(
        self,
        exits,
        weight=1.0,
        temperature=3.0,
        xi=0.5,
        feature_weight=0.0,
        head=None,
        direction="deep_to_shallow",
        scale_final_label=False,
        name=None,
        **kwargs,
    ):
        if "alpha" in kwargs:
            warnings.warn(
                "`AuxiliaryExits(alpha=...)` is deprecated and will be "
                "removed in the next release: pass `xi=...`, the label "
                "weight's name in every term.",
                DeprecationWarning,
                stacklevel=2,
            )
            xi = kwargs.pop("alpha")
        weights = weight if isinstance(weight, (list, tuple)) else None
        super().__init__(
            weight=1.0 if weights is not None else weight, name=name, **kwargs
        )
        if isinstance(exits, exits_module.Exits):
            self._given_exits = exits
            self.exit_names = list(exits.exit_names)
        elif isinstance(exits, (list, tuple)) and all(
            isinstance(n, str) for n in exits
        ):
            self._given_exits = None
            self.exit_names = list(exits)
        else:
            raise TypeError(
                "`exits` must be a list of layer names or the `Exits` model "
                f"from `attach_exits`. Received: exits={exits!r}"
            )
        if not self.exit_names:
            raise ValueError(
                "`exits` is empty: name at least one layer. Received: exits=[]"
            )
        if weights is not None and len(weights) != len(self.exit_names):
            raise ValueError(
                f"Give one weight per exit ({len(self.exit_names)} exits: "
                f"{self.exit_names}). Received: weight={list(weights)}"
            )
        if direction not in _DIRECTIONS:
            raise ValueError(
                f"`direction` must be one of {_DIRECTIONS}. "
                f"Received: direction={direction!r}"
            )
        if not isinstance(scale_final_label, bool):
            raise TypeError(
                "`scale_final_label` must be True (BYOT's objective: the "
                "final head's loss weighs 1 - xi) or False. "
                f"Received: scale_final_label={scale_final_label!r}"
            )
        if scale_final_label and direction != "deep_to_shallow":
            raise ValueError(
                "`scale_final_label` is BYOT's objective, where the deepest "
                "exit teaches; with direction='shallow_to_deep' the final "
                "head already has its own KL part. Received: "
                f"direction={direction!r}, scale_final_label=True"
            )
        exits_module.check_head(head)
        self.head = head
        self.direction = direction
        self.scale_final_label = scale_final_label
        self._per_exit_weights = weights is not None
        for index, value in enumerate(weights or []):
            self.add_hyperparameter(f"weight_{index}", value, minimum=0.0)
        self.add_hyperparameter(
            "temperature", temperature, minimum=0.0, strict=True
        )
        self.add_hyperparameter("xi", xi, minimum=0.0)
        xi = schedules.as_schedule(xi)
        xi_high = (
            xi.value_range()[1] if isinstance(xi, schedules.Schedule) else xi
        )
        if xi_high > 1.0:
            raise ValueError(
                "`xi` (formerly `alpha`) is the share of the distillation "
                f"part and must be in [0, 1]. Received: xi={xi}"
            )
        self.add_hyperparameter("feature_weight", feature_weight, minimum=0.0)
        feature_weight = schedules.as_schedule(feature_weight)
        self.hints = isinstance(feature_weight, schedules.Schedule) or (
            feature_weight > 0
        )
        self.exit_model = None
        self.projections = []
        self.exit_accuracies = [
            ExitAccuracy(f"{n}_accuracy") for n in self.exit_names
        ]

    @property
    def taps(self):
        return self.exit_names + ([DEEPEST_FEATURES] if self.hints else [])

    @property
    def output_key(self):
        return None if self.exit_model is None else self.exit_model.output_key

    @property
    def exports(self):
        return {"exits": self.exit_model}

    @property
    def validation_metrics(self):
        return [m.name for m in self.exit_accuracies]

    def forward(self, outputs, training=None):
        extra = {}
        for name in self.exit_names:
            extra[name] = self.exit_model.heads[name](
                outputs[name], training=training
            )
            if self.hints:
                extra[exits_module.features_key(name)] = exits_module.pool(
                    outputs[name]
                )
        if self.hints:
            extra[DEEPEST_FEATURES] = exits_module.pool(
                outputs[DEEPEST_FEATURES]
            )
        return extra

    def update_metrics(self, y, y_pred, sample_weight):
        if y is None:
            return
        for name, metric in zip(self.exit_names, self.exit_accuracies):
            metric.update_exit(y, y_pred[name], sample_weight)

    @property
    def mixes_labels(self):
        return self.scale_final_label

    def mixing(self, step, epoch, mask):
        if not self.scale_final_label:
            return 1.0, None
        return 1.0, 1.0 - self.hyperparameter("xi", step, epoch)

    temperature = hyperparameter_property("temperature")

    @property
    def alpha(self):
        """Deprecated name of `xi`."""
        # Keras's saving reads every attribute of a layer it walks.
        if not _internals.called_by_keras():
            warnings.warn(
                "`AuxiliaryExits.alpha` is deprecated and will be removed in "
                "the next release: use `xi`.",
                DeprecationWarning,
                stacklevel=2,
            )
        return self.xi

    @alpha.setter
    def alpha(self, value):
        warnings.warn(
            "`AuxiliaryExits.alpha` is deprecated and will be removed in the "
            "next release: use `xi`.",
            DeprecationWarning,
            stacklevel=2,
        )
        self.xi = value

    @property
    def feature_weight(self):
        return self._get_hyperparameter("feature_weight")

    @feature_weight.setter
    def feature_weight(self, value):
        if not self.hints:
            raise ValueError(
                "This term was built without feature hints "
                "(feature_weight=0), so no projection exists to train. "
                "Construct it with a positive `feature_weight` (or a "
                f"schedule starting at 0). Received: feature_weight={value}"
            )
        self._set_hyperparameter("feature_weight", value)

    def attach(self, student):
        if self.exit_model is not None:
            if self.exit_model.student is not student:
                raise ValueError(
                    f"AuxiliaryExits '{self.name}' is attached to the student "
                    f"'{self.exit_model.student.name}' already; create one "
                    "term per distiller."
                )
            return
        given = self._given_exits
        if given is not None:
            if given.student is not student:
                raise ValueError(
                    f"The exits were attached to '{given.student.name}', not "
                    f"to the distiller's student '{student.name}'. Call "
                    "`attach_exits` on the student you distil."
                )
            if self.hints and not given.features:
                raise ValueError(
                    "Feature hints need the exits' features: build them "
                    "with `attach_exits(..., features=True)`. "
                    f"Received: feature_weight={self.feature_weight}"
                )
            exit_model = given
        else:
            exit_model = exits_module.attach_exits(
                student, self.exit_names, head=self.head, features=self.hints
            )
        if self.hints:
            if exit_model.graph is None:
                raise ValueError(
                    "Feature hints need the feature widths, which a "
                    f"subclassed student ('{student.name}') does not expose; "
                    "use feature_weight=0 or a Functional student."
                )
            outputs = exit_model.graph.output
            width = outputs[DEEPEST_FEATURES].shape[-1]
            self.projections = []
            for name in self.exit_names:
                exit_width = outputs[exits_module.features_key(name)].shape[-1]
                if exit_width == width:
                    projection = keras.layers.Identity(name=f"{name}_hint")
                else:
                    projection = keras.layers.Dense(
                        width, use_bias=False, name=f"{name}_hint"
                    )
                # Built now, so that loading a saved distiller finds them.
                projection.build((None, exit_width))
                self.projections.append(projection)
        self.exit_model = exit_model

    def compute_loss(self, x, y, y_pred, sample_weight, step, epoch):
        if not isinstance(y_pred, dict) or OUTPUT not in y_pred:
            raise ValueError(
                f"AuxiliaryExits '{self.name}' needs the exits' outputs; add "
                "the term to a `Distiller`, which runs the student with its "
                f"exits. Received: outputs of type {type(y_pred).__name__}"
            )
        if y is not None and not hasattr(y, "shape"):
            raise ValueError(
                "AuxiliaryExits trains every exit on one label tensor. "
                f"Received: labels of type {type(y).__name__}"
            )
        temperature = self.hyperparameter("temperature", step, epoch)
        xi = self.hyperparameter("xi", step, epoch)
        final = ops.cast(y_pred[OUTPUT], "float32")
        exit_logits = [ops.cast(y_pred[n], "float32") for n in self.exit_names]
        teaching = self.direction == "deep_to_shallow"
        teacher = ops.stop_gradient(final)
        if self.hints:
            feature_weight = self.hyperparameter("feature_weight", step, epoch)
            deepest = ops.stop_gradient(
                ops.cast(y_pred[DEEPEST_FEATURES], "float32")
            )
        total = None
        for index, (name, logits) in enumerate(
            zip(self.exit_names, exit_logits)
        ):
            if y is None:
                value = ksd_ops.kl_divergence(teacher, logits, temperature)
            elif teaching:
                value = (1.0 - xi) * _cross_entropy(
                    y, logits
                ) + xi * ksd_ops.kl_divergence(teacher, logits, temperature)
            else:
                value = _cross_entropy(y, logits)
            if self.hints:
                features = ops.cast(
                    y_pred[exits_module.features_key(name)], "float32"
                )
                hint = self.projections[index](features) - deepest
                value = value + feature_weight * ops.mean(
                    ops.square(hint), axis=-1
                )
            if self._per_exit_weights:
                value = value * self.hyperparameter(
                    f"weight_{index}", step, epoch
                )
            total = value if total is None else total + value
        if not teaching:
            # The exits' tempered distributions, averaged and detached, as
            # a teacher for the final head.
            ensemble = ksd_targets.mixture(
                ops.stack(
                    [
                        ksd_targets.log_probs(
                            ops.stop_gradient(e), temperature=temperature
                        )
                        for e in exit_logits
                    ]
                )
            )
            total = total + xi * ksd_ops.kl_divergence(
                ensemble, final, temperature, teacher_kind=ksd_targets.LOG_PROBS
            )
        return self.reduce(total, sample_weight)

    def get_config(self):
        if self._given_exits is not None or callable(self.head):
            raise TypeError(
                f"AuxiliaryExits '{self.name}' was built with custom heads "
                "(an `Exits` model or a head factory), which cannot be "
                "written to a config. Save `distiller.student`, or the "
                "weights (`save_weights`, `BackupAndRestore`)."
            )
        config = super().get_config()
        config.update(
            exits=self.exit_names,
            temperature=self.hyperparameter_config("temperature"),
            feature_weight=self.hyperparameter_config("feature_weight"),
            head=self.head,
            direction=self.direction,
            scale_final_label=self.scale_final_label,
        )
        if self._per_exit_weights:
            config["weight"] = [
                self.hyperparameter_config(f"weight_{i}")
                for i in range(len(self.exit_names))
            ]
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "alpha" in config:
            # A file of release 0.1.0.
            config["xi"] = config.pop("alpha")
        for name in ("temperature", "xi", "feature_weight"):
            if name in config:
                config[name] = schedules.deserialize(config[name])
        if isinstance(config.get("weight"), list):
            config["weight"] = [
                schedules.deserialize(w) for w in config["weight"]
            ]
        return super().from_config(config)


def _cross_entropy(y, logits):
    if ksd_ops.one_hot_labels(y, logits):
        return keras.losses.categorical_crossentropy(
            ops.cast(y, "float32"), logits, from_logits=True
        )
    if len(y.shape) == 2 and y.shape[-1] == 1:
        y = ops.squeeze(y, axis=-1)
    return keras.losses.sparse_categorical_crossentropy(
        y, logits, from_logits=True
    )
