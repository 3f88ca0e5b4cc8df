import keras
from keras import ops

from keras_selfdistill._forward import tap_shapes
from keras_selfdistill.teachers.frozen_model import as_teacher
from keras_selfdistill.terms.term import Term

_PROJECTORS = ("linear", "conv1x1", "orthogonal")
_LOSSES = ("mse", "l1", "cosine")
_NORMALIZATIONS = ("layer", "batch")


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class FeatureDistillation(Term):
    """Matches an intermediate layer of the student to one of a teacher.

    FitNets hints and their successors: the student's features at
    `student_layer`, through a learnable projector `P`, regress the
    teacher's features at `teacher_layer`,

    `loss(align(P(f_s)), N(f_t))`

    with `f_t` from the teacher in inference mode, without gradient, and
    `N` an optional normalisation of it. The student's features come from
    its one forward pass of the step (Keras's own
    `keras.distillation.FeatureDistillation` runs the student a second
    time), and the teacher runs only up to `teacher_layer`. The projector
    trains with the student and belongs to the term: `distiller.student`
    stays the plain student.

    - Projectors: `"linear"` (a `Dense` on the channel axis, a 1×1
      convolution without activation for feature maps; the linear
      projector of the projector studies), `"conv1x1"` (1×1 convolution,
      batch normalisation and ReLU: FitNets' regressor as mdistiller's
      `ConvReg` builds it when the sizes match, with PyTorch's batch
      normalisation constants, ε = 1e-5 and momentum 0.1, i.e. Keras's
      `momentum=0.9`, not Keras's defaults; the convolution's bias, which
      the normalisation cancels in training, is left out), `"orthogonal"`
      (V_kD: a linear map with orthonormal rows or columns, `W = Q` of the QR
      decomposition of a free matrix), `None` (identity, for equal widths)
      or a factory `projector(student_shape, teacher_shape)` returning a
      Keras layer.
    - Shapes: after the projector, feature maps of another size are
      average-pooled when the student's sizes are multiples of the
      teacher's, and bilinearly resized otherwise (2-D maps); a map meets
      a vector by global average pooling. A vector cannot become a map:
      that raises a `ValueError` before training.
    - Normalisation of the teacher's features: `"layer"` standardises each
      position over channels (per sample, so the same under any
      distribution); `"batch"` standardises each channel over the batch
      and positions, as V_kD does for classification (under
      `tf.distribute`, over each replica's batch).
    - Losses, per sample: `"mse"` the mean squared difference, `"l1"` the
      mean absolute difference, `"cosine"` `1 − cos` over channels,
      averaged over positions; then reduced over the batch as Keras
      reduces the compiled loss, with `sample_weight`.

    A `Snapshot` teacher gives no features before its first snapshot:
    those steps add nothing to this term.

    The published setting (mdistiller's FitNets, `engine/cfg.py`): the
    hint at the second stage, weight 100 against a cross-entropy weight
    of 1, `"conv1x1"`, `"mse"`. `weight` defaults to 1 here, since the
    scale of the features, and so of the loss, depends on the network.

    Reference:

    - [Romero et al., 2015](https://arxiv.org/abs/1412.6550) (FitNets)
    - [Miles et al., 2024](https://arxiv.org/abs/2403.06213) (V_kD)
    - [Miles & Mikolajczyk, 2024](https://arxiv.org/abs/2303.11098)
      (the role of the projector)

    Args:
        teacher: A `keras.Model` (used frozen, for its features only: its
            head, a softmax or another number of classes, is not checked)
            or a `FrozenModel`, `EMA`, `Snapshot` or `RandomInit` teacher
            (self-feature distillation).
        student_layer: Name of the student's layer (a Functional student),
            key of a subclassed student's output dict, or
            `"deepest_features"` (the input of its output layer).
        teacher_layer: Name of the teacher's layer. Defaults to `None`
            (the same name as `student_layer`).
        projector: `"linear"`, `"conv1x1"`, `"orthogonal"`, `None` or a
            factory. Defaults to `"linear"`.
        loss: `"mse"`, `"l1"` or `"cosine"`. Defaults to `"mse"`.
        normalize: `None`, `"layer"` or `"batch"`. Defaults to `None`.
        weight: Non-negative number or schedule. Defaults to `1.0`.
        name: Name of the term; its metric is `<name>_loss`. Defaults to
            `"feature_distillation"`.

    Example:

    ```python
    ksd = keras_selfdistill
    distiller = ksd.Distiller(student, [
        ksd.terms.Distillation(teacher, temperature=4.0),
        ksd.terms.FeatureDistillation(
            teacher, student_layer="block2", teacher_layer="stage2",
            projector="orthogonal", weight=0.5),
    ])
    distiller.compile("adam", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    distiller.fit(x_train, y_train, epochs=10)
    ```
    """

    reads_forward = True

    def __init__(
        self,
        teacher,
        student_layer,
        teacher_layer=None,
        projector="linear",
        loss="mse",
        normalize=None,
        weight=1.0,
        name=None,
        **kwargs,
    ):
        super().__init__(weight=weight, name=name, **kwargs)
        for arg, value in (
            ("student_layer", student_layer),
            ("teacher_layer", teacher_layer),
        ):
            if value is not None and not isinstance(value, str):
                raise TypeError(
                    f"`{arg}` must be a layer name (a string). "
                    f"Received: {arg}={value!r}"
                )
        if student_layer is None:
            raise TypeError(
                "`student_layer` must name the student's layer to distil. "
                "Received: student_layer=None"
            )
        factory = callable(projector) and not isinstance(
            projector, keras.layers.Layer
        )
        if (
            projector is not None
            and not factory
            and projector not in (_PROJECTORS)
        ):
            raise ValueError(
                f"`projector` must be None, one of {_PROJECTORS} or a "
                "callable `projector(student_shape, teacher_shape)` "
                f"returning a Keras layer. Received: projector={projector!r}"
            )
        if loss not in _LOSSES:
            raise ValueError(
                f"Unknown feature loss. Expected one of {_LOSSES}. "
                f"Received: loss={loss!r}"
            )
        if normalize is not None and normalize not in _NORMALIZATIONS:
            raise ValueError(
                f"`normalize` must be None or one of {_NORMALIZATIONS}. "
                f"Received: normalize={normalize!r}"
            )
        self.teacher = as_teacher(teacher, "FeatureDistillation", True)
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer or student_layer
        self.projector = projector
        self.loss = loss
        self.normalize = normalize
        self.projection = None
        self._align = None

    @property
    def teachers(self):
        return [self.teacher]

    @property
    def taps(self):
        return [self.student_layer]

    @property
    def _key(self):
        return f"{self.name}_features"

    def attach(self, student):
        self.teacher.attach(student)
        student_shape = tap_shapes(student, [self.student_layer])[
            self.student_layer
        ]
        teacher_shape = self.teacher.feature_shape(self.teacher_layer)
        if self.projection is None:
            self.projection = _projection(
                self.projector, student_shape, teacher_shape, self.name
            )
            # Built now, so that the optimizer and a loaded file find it.
            self.projection.build(student_shape)
        projected = tuple(self.projection.compute_output_shape(student_shape))
        if projected[-1] != teacher_shape[-1]:
            raise ValueError(
                f"FeatureDistillation '{self.name}': the projected student "
                f"features have {projected[-1]} channels, the teacher's "
                f"'{self.teacher_layer}' {teacher_shape[-1]}. Use a "
                "projector (e.g. 'linear') that maps between them. "
                f"Received: projector={self.projector!r}"
            )
        self._align = _alignment(projected, teacher_shape, self.name)

    def forward(self, outputs, training=None):
        if not training:
            return {}
        features = outputs[self.student_layer]
        return {self._key: self.projection(features, training=training)}

    def compute_loss(self, x, y, y_pred, sample_weight, step, epoch):
        return self.compute_loss_and_mask(
            x, y, y_pred, sample_weight, step, epoch
        )[0]

    def compute_loss_and_mask(self, x, y, y_pred, sample_weight, step, epoch):
        if not isinstance(y_pred, dict) or self._key not in y_pred:
            raise ValueError(
                f"FeatureDistillation '{self.name}' reads the student's "
                "features from its forward pass: add the term to a "
                "`Distiller`, which runs the student with it. Received: "
                f"outputs of type {type(y_pred).__name__}"
            )
        student = self._align(ops.cast(y_pred[self._key], "float32"))
        teacher, mask = self.teacher.features_and_mask(x, self.teacher_layer)
        teacher = _normalized(ops.cast(teacher, "float32"), self.normalize)
        values = _feature_loss(teacher, student, self.loss)
        if mask is not None:
            values = values * mask
        return self.reduce(values, sample_weight), mask

    def get_config(self):
        if callable(self.projector):
            raise TypeError(
                f"FeatureDistillation '{self.name}' was built with a "
                "projector factory, which cannot be written to a config. "
                "Save `distiller.student`, or the weights (`save_weights`, "
                "`BackupAndRestore`)."
            )
        config = super().get_config()
        config.update(
            teacher=keras.saving.serialize_keras_object(self.teacher),
            student_layer=self.student_layer,
            teacher_layer=self.teacher_layer,
            projector=self.projector,
            loss=self.loss,
            normalize=self.normalize,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["teacher"] = keras.saving.deserialize_keras_object(
            config["teacher"]
        )
        return super().from_config(config)


def _projection(projector, student_shape, teacher_shape, name):
    channels = teacher_shape[-1]
    if projector is None:
        return keras.layers.Identity(name=f"{name}_projector")
    if callable(projector):
        layer = projector(student_shape, teacher_shape)
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                "A `projector` factory must return a Keras layer. Received: "
                f"{layer!r} from projector({student_shape}, {teacher_shape})"
            )
        return layer
    if projector == "linear":
        return keras.layers.Dense(channels, name=f"{name}_projector")
    if projector == "orthogonal":
        return _OrthogonalProjection(channels, name=f"{name}_projector")
    rank = len(student_shape)
    convolution = {
        3: keras.layers.Conv1D,
        4: keras.layers.Conv2D,
        5: keras.layers.Conv3D,
    }.get(rank)
    first = (
        convolution(channels, 1, use_bias=False)
        if convolution is not None
        else keras.layers.Dense(channels, use_bias=False)
    )
    # PyTorch's BatchNorm2d, as mdistiller's ConvReg uses it: ε = 1e-5 and
    # running statistics with momentum 0.1 (Keras's 0.9); Keras's defaults
    # (1e-3, 0.99) changed the hint loss by 0.76% after one step.
    normalization = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    return keras.Sequential(
        [first, normalization, keras.layers.ReLU()],
        name=f"{name}_projector",
    )


def _alignment(student_shape, teacher_shape, name):
    """The function taking projected student features to the teacher's."""
    student_rank, teacher_rank = len(student_shape), len(teacher_shape)
    cannot = (
        f"FeatureDistillation '{name}': the student's features of shape "
        f"{student_shape} cannot be matched to the teacher's {teacher_shape}"
    )
    if teacher_rank == 2 and student_rank > 2:
        axes = tuple(range(1, student_rank - 1))
        return lambda features: ops.mean(features, axis=axes)
    if student_rank != teacher_rank:
        raise ValueError(
            f"{cannot}: a vector has no positions to match a map's. Tap a "
            f"student layer with a map of the same rank. Received: ranks "
            f"{student_rank} and {teacher_rank}"
        )
    student_sizes, teacher_sizes = student_shape[1:-1], teacher_shape[1:-1]
    if student_sizes == teacher_sizes:
        return lambda features: features
    if None in student_sizes or None in teacher_sizes:
        raise ValueError(
            f"{cannot}: sizes unknown before training differ. Received: "
            f"{student_sizes} and {teacher_sizes}"
        )
    if all(s % t == 0 for s, t in zip(student_sizes, teacher_sizes)):
        factors = tuple(s // t for s, t in zip(student_sizes, teacher_sizes))
        pooling = {
            1: keras.layers.AveragePooling1D,
            2: keras.layers.AveragePooling2D,
            3: keras.layers.AveragePooling3D,
        }[len(factors)](factors)
        return pooling
    if len(student_sizes) != 2:
        raise ValueError(
            f"{cannot}: only 2-D maps are resized; other sizes must be "
            f"multiples of the teacher's. Received: sizes {student_sizes} "
            f"and {teacher_sizes}"
        )
    return lambda features: ops.image.resize(
        features, teacher_sizes, interpolation="bilinear"
    )


def _normalized(features, normalize):
    if normalize is None:
        return features
    if normalize == "layer":
        axes = (-1,)
    else:
        axes = tuple(range(len(features.shape) - 1))
    mean = ops.mean(features, axis=axes, keepdims=True)
    variance = ops.var(features, axis=axes, keepdims=True)
    return (features - mean) / ops.sqrt(variance + 1e-5)


def _feature_loss(teacher, student, loss):
    axes = tuple(range(1, len(student.shape)))
    if loss == "mse":
        return ops.mean(ops.square(student - teacher), axis=axes)
    if loss == "l1":
        return ops.mean(ops.abs(student - teacher), axis=axes)
    dot = ops.sum(student * teacher, axis=-1)
    norms = ops.sqrt(
        ops.sum(ops.square(student), axis=-1)
        * ops.sum(ops.square(teacher), axis=-1)
    )
    cosine = dot / ops.maximum(norms, 1e-8)
    distance = 1.0 - cosine
    if len(distance.shape) > 1:
        distance = ops.mean(distance, axis=tuple(range(1, len(distance.shape))))
    return distance


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class _OrthogonalProjection(keras.layers.Layer):
    """A linear map with orthonormal columns (or rows): V_kD's projector.

    The kernel is `Q · diag(sign(diag(R)))` from the reduced QR
    decomposition of a free `(in, out)` matrix (of its transpose when
    `in < out`), so `WᵀW = I` when it maps down and `WWᵀ = I` when it
    maps up: the projection keeps the student's feature geometry.
    """

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)

    def build(self, input_shape):
        self.free = self.add_weight(
            shape=(input_shape[-1], self.units),
            initializer="orthogonal",
            name="free",
        )

    def kernel(self):
        free = ops.cast(self.free, "float32")
        wide = free.shape[0] < free.shape[1]
        matrix = ops.transpose(free) if wide else free
        q, r = ops.qr(matrix, mode="reduced")
        q = q * ops.sign(ops.diagonal(r) + 1e-12)
        return ops.transpose(q) if wide else q

    def call(self, inputs):
        kernel = ops.cast(self.kernel(), self.compute_dtype)
        return ops.matmul(inputs, kernel)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config["units"] = self.units
        return config
