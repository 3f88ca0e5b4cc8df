"""Where soft targets come from: layers that own their state."""

from keras_selfdistill.teachers.cached import Cached
from keras_selfdistill.teachers.ddim import DDIM
from keras_selfdistill.teachers.ema import EMA
from keras_selfdistill.teachers.ensemble import Ensemble
from keras_selfdistill.teachers.frozen_model import FrozenModel
from keras_selfdistill.teachers.past_predictions import PastPredictions
from keras_selfdistill.teachers.random_init import RandomInit
from keras_selfdistill.teachers.snapshot import Snapshot
from keras_selfdistill.teachers.teacher import Teacher

__all__ = [
    "Cached",
    "DDIM",
    "EMA",
    "Ensemble",
    "FrozenModel",
    "PastPredictions",
    "RandomInit",
    "Snapshot",
    "Teacher",
]
