import keras
import numpy as np
from keras import ops

from keras_selfdistill import _internals
from keras_selfdistill.teachers.teacher import Teacher
from keras_selfdistill.teachers.teacher import final_activation
from keras_selfdistill.teachers.teacher import num_classes
from keras_selfdistill.teachers.teacher import refuse_probabilities


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class FrozenModel(Teacher):
    """A pre-trained Keras model used as a fixed teacher.

    The model is set to `trainable = False` and always called with
    `training=False`, so its weights and its BatchNorm moving statistics
    are bit-identical before and after `fit`; its outputs carry no
    gradient. A bare `keras.Model` given as a teacher is wrapped in this
    class.

    Reference:

    - [Hinton et al., 2015](https://arxiv.org/abs/1503.02531)

    A model that ends in a softmax (every `keras.applications` model by
    default) returns probabilities, not logits: it is refused unless
    `from_logits=False` says so, and its log-probabilities are then used
    as logits (same softmax, so the targets are exact).

    Args:
        model: A built `keras.Model` returning logits with the student's
            number of classes.
        from_logits: Whether the model returns logits. `False` for a model
            that returns softmax probabilities; `None` for a model whose
            outputs are not targets (a feature teacher: a
            `keras.applications` backbone with any head or none), which
            skips the output checks and serves only features. Defaults to
            `True`.
        input_key: Key of the teacher's own input when the batch inputs are
            a dict (privileged information, as in prompt distillation).
            Defaults to `None` (same inputs as the student).
        name: Name of the layer. Defaults to `"frozen_model"`.

    Example:

    ```python
    teacher = keras_selfdistill.teachers.FrozenModel(big_model)
    term = keras_selfdistill.terms.Distillation(teacher, temperature=4.0)
    ```
    """

    def __init__(
        self, model, from_logits=True, input_key=None, name=None, **kwargs
    ):
        super().__init__(input_key=input_key, name=name, **kwargs)
        if not isinstance(model, keras.Model):
            raise TypeError(
                "A FrozenModel teacher must be a `keras.Model` returning "
                "logits. Wrap a bare layer or function in a Functional "
                f"model first. Received: model={model!r}"
            )
        if from_logits is not None and not isinstance(from_logits, bool):
            raise TypeError(
                "`from_logits` must be True (the model returns logits), "
                "False (softmax probabilities) or None (features only). "
                f"Received: from_logits={from_logits!r}"
            )
        activation = None if from_logits is None else final_activation(model)
        if from_logits and activation is not None:
            refuse_probabilities("teacher", model.name, activation)
        if not from_logits and activation == "sigmoid":
            raise ValueError(
                f"The teacher '{model.name}' ends in a sigmoid: independent "
                "per-class probabilities are not one distribution over the "
                "classes. Remove the sigmoid and use its logits. "
                "Received: from_logits=False"
            )
        model.trainable = False
        self.model = model
        self.from_logits = from_logits

    @property
    def returns_model_outputs(self):
        return bool(self.from_logits)

    def attach(self, student):
        if self.model is student:
            raise ValueError(
                "The teacher is the student model itself, so it would learn "
                "with the student and teach nothing. For self-distillation "
                "use a teacher that follows the student (e.g. "
                "`keras_selfdistill.teachers.EMA`), or pass a separately "
                f"trained copy. Received: teacher={self.model.name!r}"
            )
        student_ids = {id(v) for v in student.variables}
        shared = [v.path for v in self.model.variables if id(v) in student_ids]
        if shared:
            raise ValueError(
                "The teacher shares variables with the student, so the "
                "student's updates would move the teacher. Give the teacher "
                "its own weights (e.g. `keras.models.clone_model` and "
                f"`set_weights`). Received: shared variables {shared[:3]}"
            )
        if self.from_logits is None:
            return
        teacher_classes = num_classes(self.model)
        student_classes = num_classes(student)
        # A term that reads only the first `_compared_width` classes (a
        # padded vocabulary) sets it; it checks the widths itself.
        if getattr(self, "_compared_width", None) is not None:
            return
        if None not in (teacher_classes, student_classes) and (
            teacher_classes != student_classes
        ):
            raise ValueError(
                f"The teacher '{self.model.name}' predicts {teacher_classes} "
                f"classes but the student '{student.name}' predicts "
                f"{student_classes}. Distillation compares distributions "
                "over the same classes: give both models the same output "
                "width. Received: teacher output shape "
                f"{self.model.output_shape}, student output shape "
                f"{student.output_shape}"
            )

    def on_train_begin(self):
        # A diverged or half-loaded checkpoint would give NaN targets and a
        # NaN loss from the first step; one pass over the weights is cheap.
        for variable in self.model.variables:
            value = _internals.to_numpy(variable)
            bad = np.size(value) - np.isfinite(value).sum()
            if value.dtype.kind == "f" and bad:
                raise ValueError(
                    f"The teacher '{self.model.name}' has NaN or infinite "
                    f"weights in '{variable.path}', so its targets would be "
                    "NaN. Load a checkpoint saved before training diverged. "
                    f"Received: {bad} non-finite values of {np.size(value)}"
                )

    def targets(self, x, y_pred, temperature):
        if self.from_logits is None:
            raise ValueError(
                f"The teacher '{self.model.name}' was given for its features "
                "(from_logits=None), so its outputs are not targets. Pass "
                "the model itself, or `FrozenModel(model)`, to this term. "
                "Received: from_logits=None"
            )
        outputs = self._logits(self.model, x)
        if self.from_logits:
            return outputs
        # log p has the same softmax as the logits that gave p.
        return ops.log(ops.maximum(ops.cast(outputs, "float32"), 1e-30))

    def feature_models(self):
        return [self.model]

    def get_config(self):
        config = super().get_config()
        config["from_logits"] = self.from_logits
        model = keras.saving.serialize_keras_object(self.model)
        # The teacher's own training setup is not part of the distiller:
        # reloading it would rebuild an optimizer with no variables to load.
        model.pop("compile_config", None)
        config["model"] = model
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)


def as_teacher(teacher, owner, features=False):
    """Returns `teacher` as a `Teacher`, wrapping a bare `keras.Model`.

    With `features`, a bare model serves features only: its outputs (a
    softmax head, another number of classes) are not checked.
    """
    if isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, keras.Model):
        return FrozenModel(teacher, from_logits=None if features else True)
    raise TypeError(
        f"{owner} expects a teacher: a `keras.Model` (used frozen) or a "
        "`keras_selfdistill.teachers.Teacher`. "
        f"Received: teacher={teacher!r} of type {type(teacher).__name__}"
    )
