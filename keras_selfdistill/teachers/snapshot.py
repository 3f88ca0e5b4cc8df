import keras
from keras import ops

from keras_selfdistill import _internals
from keras_selfdistill import targets as ksd_targets
from keras_selfdistill._arguments import check_positive_int
from keras_selfdistill.batch import select_input
from keras_selfdistill.teachers.teacher import Teacher
from keras_selfdistill.teachers.teacher import clone_student
from keras_selfdistill.teachers.teacher import copy_variables

_COMBINE = ("average", "vote")


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class Snapshot(Teacher):
    """Frozen copies of the student taken every `freq` epochs.

    At the end of every `freq`-th epoch the student's weights are copied
    into a snapshot; the last `keep` snapshots teach together, by averaging
    their tempered distributions (`combine="average"`) or by the fraction of
    snapshots voting for each class (`combine="vote"`, the voting teachers
    of SD-DARTS); either mixture gives every class `1e-6` more probability,
    renormalised, so that a class no snapshot voted for keeps a finite
    log-probability. Until the first snapshot there is no target: the term
    adds nothing and the labels keep full weight (no `1 − ξ`). Snapshots
    are variables, so checkpoints carry them.

    Each snapshot runs forward every step: `keep` extra student forwards.

    Reference:

    - [Furlanello et al., 2018](https://arxiv.org/abs/1805.04770)
      (born-again networks)
    - [Zhu et al., 2023](https://arxiv.org/abs/2302.05629) (SD-DARTS)

    Args:
        freq: Take a snapshot every `freq` epochs. Defaults to `1`.
        keep: Number of most recent snapshots that teach. Defaults to `1`.
        combine: `"average"` or `"vote"`. Defaults to `"average"`.
        input_key: Key of the student's input when the batch inputs are a
            dict (the `Distiller`'s `input_key`). Defaults to `None`.
        name: Name of the layer. Defaults to `"snapshot"`.

    Example:

    ```python
    teacher = keras_selfdistill.teachers.Snapshot(freq=5, keep=3,
                                                  combine="vote")
    term = keras_selfdistill.terms.Distillation(teacher, xi=0.5)
    ```
    """

    def __init__(
        self, freq=1, keep=1, combine="average", input_key=None, name=None
    ):
        super().__init__(input_key=input_key, name=name)
        check_positive_int("Snapshot", "freq", freq)
        check_positive_int("Snapshot", "keep", keep)
        if combine not in _COMBINE:
            raise ValueError(
                f"Snapshot `combine` must be one of {_COMBINE}. "
                f"Received: combine={combine!r}"
            )
        self.freq = int(freq)
        self.keep = int(keep)
        self.combine = combine
        self.models = []
        self.taken = self.add_weight(
            shape=(),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            name="taken",
        )

    def attach(self, student):
        if not self._follow(student):
            return
        self.models = [
            clone_student(student, "The Snapshot teacher", copy_weights=False)
            for _ in range(self.keep)
        ]

    def on_epoch_end(self, epoch):
        if (epoch + 1) % self.freq:
            return
        taken = int(_internals.to_numpy(self.taken))
        slot = self.models[taken % self.keep]
        copy_variables(slot.variables, self._student.variables)
        self.taken.assign(taken + 1)

    follows_student = True

    def targets(self, x, y_pred, temperature):
        return self.targets_and_mask(x, y_pred, temperature)[0]

    # The snapshots' mixture, or their vote, at the temperature asked for.
    target_kind = ksd_targets.LOG_PROBS

    def targets_and_mask(self, x, y_pred, temperature):
        temperature = ops.cast(temperature, "float32")
        logits = ops.stack(
            [
                ops.cast(self._logits(model, x), "float32")
                for model in self.models
            ]
        )
        mask, batch = self._taken_masks(logits)
        if self.combine == "average":
            log_probs = ksd_targets.log_probs(logits, temperature=temperature)
        else:
            votes = ops.one_hot(ops.argmax(logits, axis=-1), logits.shape[-1])
            log_probs = ops.where(votes > 0.0, 0.0, ksd_targets.LOG_ZERO)
        # Before the first snapshot every slot's weight is 0; equal weights
        # keep the rows that `batch` leaves out finite.
        weights = ops.reshape(mask, (-1,)) + ops.cast(
            ops.sum(mask) == 0.0, "float32"
        )
        mixed = ksd_targets.mixture(log_probs, weights, smoothing=1e-6)
        return ops.stop_gradient(mixed), batch

    def feature_models(self):
        return self.models

    def features_and_mask(self, x, layer_name):
        # The mean over the snapshots taken so far; none before the first.
        inputs = select_input(x, self.input_key, f"Teacher '{self.name}'")
        values = ops.stack(
            [
                ops.cast(self._tapped(model, layer_name)(inputs), "float32")
                for model in self.models
            ]
        )
        mask, batch = self._taken_masks(values)
        mean = ops.sum(mask * values, axis=0) / ops.maximum(ops.sum(mask), 1.0)
        return ops.stop_gradient(mean), batch

    def _taken_masks(self, stacked):
        """Which slots hold a snapshot, shaped to broadcast over `stacked`
        (slots first), and the `(batch,)` mask: 1 once any was taken."""
        available = ops.minimum(self.taken, self.keep)
        slots = ops.cast(
            ops.arange(self.keep, dtype="int32") < available, "float32"
        )
        slots = ops.reshape(slots, (-1,) + (1,) * (len(stacked.shape) - 1))
        batch = ops.cast(available > 0, "float32") * ops.ones(
            ops.shape(stacked)[1:2], "float32"
        )
        return slots, batch

    def get_config(self):
        config = super().get_config()
        config.update(freq=self.freq, keep=self.keep, combine=self.combine)
        return config
