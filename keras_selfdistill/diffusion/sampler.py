"""DDIM sampling of a v-prediction diffusion model, at any number of steps.

The model is a Keras model called as `model([z, logsnr])` on noisy images
`z` and their log-SNR `(batch,)`, returning the velocity
`v = α·ε − σ·x` (v-prediction, Salimans & Ho 2022, appendix D).
"""

import keras
import numpy as np
from keras import ops

from keras_selfdistill import _arguments
from keras_selfdistill.diffusion.cosine_schedule import CosineSchedule
from keras_selfdistill.diffusion.cosine_schedule import alpha_sigma


def denoise(model, z, logsnr, clip=False):
    """The model's `(x̂, ε̂)` at `z`, without gradient.

    From the velocity: `x̂ = α·z − σ·v` and `ε̂ = σ·z + α·v` (the official
    code takes `ε̂ = (z − α·x̂) / σ`, equal in exact arithmetic; this form
    does not divide by a `σ` of 4.5e-5 at the clean end). With
    `clip=True`, `x̂` is clipped to `[−1, 1]` and `ε̂` recomputed from it as
    `(z − α·x̂) / σ`, as the official `_run_model(clip_x=True)` does.
    """
    z = ops.cast(z, "float32")
    batch = ops.shape(z)[0]
    logsnr = ops.cast(logsnr, "float32") * ops.ones((batch,), "float32")
    velocity = ops.cast(model([z, logsnr], training=False), "float32")
    velocity = ops.stop_gradient(velocity)
    alpha, sigma = per_sample(alpha_sigma(logsnr), z)
    x = alpha * z - sigma * velocity
    if not clip:
        return x, sigma * z + alpha * velocity
    x = ops.clip(x, -1.0, 1.0)
    return x, (z - alpha * x) / sigma


def per_sample(values, like):
    """Each `(batch,)` tensor of `values` shaped to broadcast over `like`."""
    rank = len(like.shape)
    return [ops.reshape(v, (-1,) + (1,) * (rank - 1)) for v in values]


def ddim_step(model, z, t, s, schedule, clip=False):
    """One deterministic DDIM step from time `t` to `s < t`.

    `z_s = α_s·x̂ + σ_s·ε̂` with the model's `(x̂, ε̂)` at `(z, λ(t))`;
    `t` and `s` are scalars or `(batch,)` times in `[0, 1]`. Returns
    `(z_s, x̂)`.
    """
    x, eps = denoise(model, z, schedule(t), clip=clip)
    alpha_s, sigma_s = per_sample(
        alpha_sigma(schedule(s) * ops.ones((ops.shape(z)[0],))), z
    )
    return alpha_s * x + sigma_s * eps, x


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
