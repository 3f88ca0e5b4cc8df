"""Diffusion samplers and their step distillation (progressive distillation).

A v-prediction diffusion model is trained and distilled with the same
`Distiller`: `keras_selfdistill.terms.Denoising` trains it on images, and
with a `keras_selfdistill.teachers.DDIM` teacher trains a student to take
one step where the teacher takes two. This package holds what surrounds
them: the schedule, the sampler, a small UNet, the rounds of progressive
distillation, the consistency sampler and sample-quality measures.
"""

from keras_selfdistill._ddim import CosineSchedule
from keras_selfdistill.diffusion.consistency import consistency_sample
from keras_selfdistill.diffusion.progressive import progressive_distillation
from keras_selfdistill.diffusion.quality import class_entropy
from keras_selfdistill.diffusion.quality import frechet_distance
from keras_selfdistill.diffusion.quality import kernel_distance
from keras_selfdistill.diffusion.sampler import sample
from keras_selfdistill.diffusion.unet import unet
from keras_selfdistill.teachers.teacher import trainable_copy

__all__ = [
    "CosineSchedule",
    "class_entropy",
    "consistency_sample",
    "frechet_distance",
    "kernel_distance",
    "progressive_distillation",
    "sample",
    "trainable_copy",
    "unet",
]
