"""Structured pruning: the smaller model that distillation then recovers."""

from keras_selfdistill.pruning.backbone import backbone_scores
from keras_selfdistill.pruning.backbone import prune_backbone
from keras_selfdistill.pruning.importance import activation
from keras_selfdistill.pruning.importance import magnitude
from keras_selfdistill.pruning.quantized import quantize
from keras_selfdistill.pruning.structured import prune

__all__ = [
    "activation",
    "backbone_scores",
    "magnitude",
    "prune",
    "prune_backbone",
    "quantize",
]
