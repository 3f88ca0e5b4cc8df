"""Callbacks for training with a distiller.

`StudentCheckpoint` saves the deployable student; `TrainingEvents` is the
callback `Distiller.fit` adds for its own epoch-level events.
"""

from keras_selfdistill.callbacks.student_checkpoint import StudentCheckpoint

__all__ = ["StudentCheckpoint"]
