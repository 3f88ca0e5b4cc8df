import math
import warnings

import keras
from keras import ops

from keras_selfdistill import _internals
from keras_selfdistill import targets as ksd_targets
from keras_selfdistill.teachers.frozen_model import as_teacher
from keras_selfdistill.teachers.teacher import Teacher


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class Ensemble(Teacher):
    """Averages the soft targets of several teachers.

    The target is the weighted mixture of the teachers' tempered softmax
    distributions (not of their logits), as in multi-teacher distillation.
    With `drop_rate > 0`, each teacher is left out of a step's mixture with
    that probability and the remaining weights renormalised (UNIC's teacher
    dropping); at least one teacher always stays. Every teacher still runs
    forward each step; dropping changes the target, not the cost.

    Reference:

    - [Sariyildiz et al., 2024](https://arxiv.org/abs/2408.17062) (UNIC)

    Args:
        members: List of teachers: `keras.Model`s (used frozen) or
            `keras_selfdistill.teachers.Teacher`s, kept as `members`.
            `teachers=` is its deprecated name.
        weights: Optional list of non-negative mixture weights, one per
            teacher, stored as `teacher_weights` (`weights` is the layer's
            variables). Defaults to `None` (equal weights).
        drop_rate: Probability in `[0, 1)` of dropping each teacher at each
            step. Defaults to `0.0`.
        seed: Seed of the dropping draws. Defaults to `None`.
        name: Name of the layer. Defaults to `"ensemble"`.

    Example:

    ```python
    teacher = keras_selfdistill.teachers.Ensemble(
        [resnet, vit], weights=[0.7, 0.3], drop_rate=0.5)
    ```
    """

    def __init__(
        self,
        members=None,
        weights=None,
        drop_rate=0.0,
        seed=None,
        name=None,
        teachers=None,
    ):
        super().__init__(name=name)
        if teachers is not None:
            if members is not None:
                raise TypeError(
                    "Pass the ensemble's teachers once, as `members`. "
                    "Received: both members and teachers"
                )
            warnings.warn(
                "`Ensemble(teachers=...)` is deprecated and will be removed "
                "in the next release: pass `members=...`.",
                DeprecationWarning,
                stacklevel=2,
            )
            members = teachers
        if not isinstance(members, (list, tuple)) or not members:
            raise ValueError(
                "Ensemble needs a non-empty list of teachers. "
                f"Received: members={members!r}"
            )
        members = [as_teacher(t, "Ensemble") for t in members]
        if weights is None:
            weights = [1.0] * len(members)
        weights = list(weights)
        if (
            len(weights) != len(members)
            or any(
                not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0
                for w in weights
            )
            or sum(weights) <= 0
        ):
            raise ValueError(
                "Ensemble `weights` must be one finite, non-negative number "
                f"per teacher ({len(members)}), with a positive sum. "
                f"Received: weights={weights!r}"
            )
        if not isinstance(drop_rate, (int, float)) or not (
            0.0 <= drop_rate < 1.0
        ):
            raise ValueError(
                "Ensemble `drop_rate` must be in [0, 1): the probability of "
                f"dropping each teacher per step. Received: "
                f"drop_rate={drop_rate!r}"
            )
        self.members = members
        self.teacher_weights = [float(w) for w in weights]
        self.drop_rate = float(drop_rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def teachers(self):
        """Deprecated name of `members`."""
        # Files of release 0.1.0 hold the members under this name, which
        # Keras's loading reads.
        if not _internals.called_by_keras():
            warnings.warn(
                "`Ensemble.teachers` is deprecated and will be removed in the "
                "next release: use `Ensemble.members`.",
                DeprecationWarning,
                stacklevel=2,
            )
        return self.members

    def attach(self, student):
        for teacher in self.members:
            teacher.attach(student)

    @property
    def follows_student(self):
        return any(t.follows_student for t in self.members)

    def walk(self):
        return [self] + [leaf for t in self.members for leaf in t.walk()]

    def targets(self, x, y_pred, temperature):
        return self.targets_and_mask(x, y_pred, temperature)[0]

    # The mixture's log-probabilities at the temperature asked for.
    target_kind = ksd_targets.LOG_PROBS

    def targets_and_mask(self, x, y_pred, temperature):
        temperature = ops.cast(temperature, "float32")
        log_probs, masks = [], []
        for teacher in self.members:
            values, mask = teacher.targets_and_mask(x, y_pred, temperature)
            log_probs.append(
                ksd_targets.log_probs(values, teacher.target_kind, temperature)
            )
            masks.append(mask)
        log_probs = ops.stack(log_probs)
        weights = ops.convert_to_tensor(self.teacher_weights, "float32")
        if self.drop_rate > 0.0:
            draws = keras.random.uniform(
                (len(self.members),), seed=self.seed_generator
            )
            keep = ops.logical_or(
                draws >= self.drop_rate, draws == ops.max(draws)
            )
            weights = ops.where(keep, weights, 0.0)
        weights = weights / ops.sum(weights)
        batch_axes = (1,) * (len(log_probs.shape) - 1)
        weights = ops.reshape(weights, (-1,) + batch_axes)
        mask = None
        if any(m is not None for m in masks):
            # Per sample, the mixture is over the members that have a
            # target for it; a sample none has a target for has no target.
            ones = ops.ones(ops.shape(log_probs)[1:2], "float32")
            present = ops.stack(
                [ones if m is None else ops.cast(m, "float32") for m in masks]
            )
            present = ops.reshape(
                present, ops.shape(present) + (1,) * (len(batch_axes) - 1)
            )
            shares = weights * present
            total = ops.sum(shares, axis=0)
            weights = ops.where(total > 0.0, shares / total, weights)
            mask = ops.cast(
                ops.reshape(total, ops.shape(total)[:1]) > 0.0, "float32"
            )
        return ops.stop_gradient(ksd_targets.mixture(log_probs, weights)), mask

    def get_config(self):
        config = super().get_config()
        config.pop("input_key", None)
        config.update(
            members=[
                keras.saving.serialize_keras_object(t) for t in self.members
            ],
            weights=self.teacher_weights,
            drop_rate=self.drop_rate,
            seed=self.seed,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "teachers" in config:
            # A file of release 0.1.0.
            config["members"] = config.pop("teachers")
        config["members"] = [
            keras.saving.deserialize_keras_object(t) for t in config["members"]
        ]
        return cls(**config)
