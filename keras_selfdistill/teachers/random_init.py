import keras

from keras_selfdistill.teachers.teacher import Teacher
from keras_selfdistill.teachers.teacher import clone_student


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class RandomInit(Teacher):
    """A frozen, randomly initialised copy of the student's architecture.

    Sarnthein et al. show that distilling from a teacher at random
    initialisation already improves the student's representations. The
    copy is drawn from the architecture's initializers when the distiller
    is built (seed it with `keras.utils.set_random_seed`) and never
    changes. This release distils its logits; feature distillation comes
    with `FeatureDistillation`.

    Reference:

    - [Sarnthein et al., 2023](https://arxiv.org/abs/2302.12091)

    Args:
        input_key: Key of the student's input when the batch inputs are a
            dict (the `Distiller`'s `input_key`). Defaults to `None`.
        name: Name of the layer. Defaults to `"random_init"`.

    Example:

    ```python
    term = keras_selfdistill.terms.Distillation(
        keras_selfdistill.teachers.RandomInit(), loss="mse")
    ```
    """

    def __init__(self, input_key=None, name=None):
        super().__init__(input_key=input_key, name=name)
        self.model = None

    def attach(self, student):
        if not self._follow(student):
            return
        self.model = clone_student(
            student, "The RandomInit teacher", copy_weights=False
        )

    def targets(self, x, y_pred, temperature):
        return self._logits(self.model, x)

    def feature_models(self):
        return [self.model]
