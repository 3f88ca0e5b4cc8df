"""How to compare the student with a target: pieces of the objective."""

from keras_selfdistill.terms.auxiliary_exits import AuxiliaryExits
from keras_selfdistill.terms.consistency import Consistency
from keras_selfdistill.terms.consistency_distillation import (
    ConsistencyDistillation,
)
from keras_selfdistill.terms.denoising import Denoising
from keras_selfdistill.terms.distillation import Distillation
from keras_selfdistill.terms.distribution_matching import DistributionMatching
from keras_selfdistill.terms.feature_distillation import FeatureDistillation
from keras_selfdistill.terms.fused_distillation import FusedDistillation
from keras_selfdistill.terms.on_policy import OnPolicy
from keras_selfdistill.terms.reflow import Reflow
from keras_selfdistill.terms.sequence_kd import SequenceKD
from keras_selfdistill.terms.taid import TAID
from keras_selfdistill.terms.term import Term

__all__ = [
    "AuxiliaryExits",
    "Consistency",
    "ConsistencyDistillation",
    "Denoising",
    "Distillation",
    "DistributionMatching",
    "FeatureDistillation",
    "FusedDistillation",
    "OnPolicy",
    "Reflow",
    "SequenceKD",
    "TAID",
    "Term",
]
