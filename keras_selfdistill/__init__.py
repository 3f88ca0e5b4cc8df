"""Knowledge distillation and self-distillation inside plain `model.fit`."""

from keras_selfdistill import batch
from keras_selfdistill import cache
from keras_selfdistill import callbacks
from keras_selfdistill import chains
from keras_selfdistill import data
from keras_selfdistill import datasets
from keras_selfdistill import diffusion
from keras_selfdistill import exits
from keras_selfdistill import files
from keras_selfdistill import generations
from keras_selfdistill import metrics
from keras_selfdistill import ops
from keras_selfdistill import plots
from keras_selfdistill import pruning
from keras_selfdistill import recipes
from keras_selfdistill import schedules
from keras_selfdistill import targets
from keras_selfdistill import teachers
from keras_selfdistill import terms
from keras_selfdistill.distiller import Distiller

__version__ = "0.1.0"

__all__ = [
    "Distiller",
    "batch",
    "cache",
    "callbacks",
    "chains",
    "data",
    "datasets",
    "diffusion",
    "exits",
    "files",
    "generations",
    "metrics",
    "ops",
    "plots",
    "pruning",
    "recipes",
    "schedules",
    "targets",
    "teachers",
    "terms",
]
