"""DDIM sampling of a v-prediction diffusion model, at any number of steps.

The model is a Keras model called as `model([z, logsnr])` on noisy images
`z` and their log-SNR `(batch,)`, returning the velocity
`v = α·ε − σ·x` (v-prediction, Salimans & Ho 2022, appendix D).
"""

import keras
import numpy as np
from keras import ops

from keras_selfdistill import _arguments
from keras_selfdistill._ddim import CosineSchedule
from keras_selfdistill._ddim import ddim_step


def sample(model, noise, num_steps, schedule=None, clip=True, batch_size=250):
    """Draws images with `num_steps` deterministic DDIM steps.

    Starts from `noise` at `t = 1` and steps through `t = i / num_steps`
    down to 0; the last step returns the model's `x̂`, as the official
    `ddim_step` does at `i = 0`. The same noise at any step count gives
    samples that can be compared step count against step count.

    Reference:

    - [Song et al., 2021 (DDIM)](https://arxiv.org/abs/2010.02502);
      `dpm.Model.ddim_step` and `sample_loop` of the official progressive
      distillation code (`google-research/diffusion_distillation`).

    Args:
        model: A v-prediction model called as `model([z, logsnr])`.
        noise: Standard normal starting points, `(n, *image_shape)`.
        num_steps: Number of sampler steps, at least 1.
        schedule: The `CosineSchedule` the model was trained with.
            Defaults to `CosineSchedule()`.
        clip: Whether each step clips `x̂` to `[−1, 1]`, the data range.
            Defaults to `True` (the official `eval_clip_denoised`).
        batch_size: Samples per model call. Defaults to `250`.

    Returns:
        A float32 NumPy array of the samples, shaped like `noise`.

    Example:

    ```python
    noise = numpy.random.default_rng(0).normal(size=(16, 28, 28, 1))
    images = keras_selfdistill.diffusion.sample(model, noise, num_steps=4)
    ```
    """
    if not _arguments.is_integer(num_steps) or num_steps < 1:
        raise ValueError(
            "`num_steps` must be an integer >= 1. Received: "
            f"num_steps={num_steps!r}"
        )
    if not _arguments.is_integer(batch_size) or batch_size < 1:
        raise ValueError(
            "`batch_size` must be an integer >= 1. Received: "
            f"batch_size={batch_size!r}"
        )
    schedule = CosineSchedule() if schedule is None else schedule
    noise = np.asarray(noise, "float32")
    batches = []
    for start in range(0, len(noise), batch_size):
        z = ops.convert_to_tensor(noise[start : start + batch_size])
        for i in reversed(range(num_steps)):
            z, x = ddim_step(
                model, z, (i + 1) / num_steps, i / num_steps, schedule, clip
            )
        batches.append(keras.ops.convert_to_numpy(x))
    return np.concatenate(batches) if batches else noise
