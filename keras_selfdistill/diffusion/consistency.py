"""Sampling a consistency model in one step or a few."""

import keras
import numpy as np
from keras import ops

from keras_selfdistill import _arguments
from keras_selfdistill._consistency import SIGMA_DATA
from keras_selfdistill._consistency import consistency_function


def consistency_sample(
    model,
    noise,
    sigmas=(80.0,),
    sigma_min=0.002,
    clip=True,
    seed=0,
    batch_size=250,
):
    """Draws images from a consistency model in `len(sigmas)` steps.

    One step is `f(σ_1·ε, σ_1)`. Each further step noises the previous
    image back to the next level, `x + √(σ_{k+1}² − σ_min²)·ε'`, and
    applies `f` there (multistep consistency sampling); `x̂` is clipped to
    `[−1, 1]` at every step, as the official sampler does. The fresh noise
    `ε'` comes from a NumPy generator seeded with `seed`, so a call is
    repeatable.

    Reference:

    - [Song et al., 2023](https://arxiv.org/abs/2303.01469), algorithm 1;
      `stochastic_iterative_sampler` of the official code
      (`openai/consistency_models`, `cm/karras_diffusion.py`).

    Args:
        model: The consistency model trained by
            `keras_selfdistill.terms.ConsistencyDistillation`, a
            v-prediction model called as `model([z, logsnr])`.
        noise: Standard normal starting points, `(n, *image_shape)`.
        sigmas: Decreasing noise levels, the first the largest of training
            (`σ_max`). Defaults to `(80.0,)`: one step. The paper's 2-step
            CIFAR-10 sampler evaluates at `(80.0, 0.821)`.
        sigma_min: The `σ_min` of training. Defaults to `0.002`.
        clip: Whether each step clips `x̂` to `[−1, 1]`. Defaults to `True`.
        seed: Seed of the noise added between steps. Defaults to `0`.
        batch_size: Samples per model call. Defaults to `250`.

    Returns:
        A float32 NumPy array of the samples, shaped like `noise`.

    Example:

    ```python
    noise = numpy.random.default_rng(0).normal(size=(16, 28, 28, 1))
    images = keras_selfdistill.diffusion.consistency_sample(student, noise)
    two_step = keras_selfdistill.diffusion.consistency_sample(
        student, noise, sigmas=(80.0, 0.821))
    ```
    """
    sigmas = [float(s) for s in sigmas]
    if (
        not sigmas
        or any(b >= a for a, b in zip(sigmas, sigmas[1:]))
        or sigmas[-1] <= sigma_min
    ):
        raise ValueError(
            "`sigmas` must be a non-empty, strictly decreasing sequence of "
            "noise levels above `sigma_min`. Received: "
            f"sigmas={tuple(sigmas)!r}, sigma_min={sigma_min!r}"
        )
    if not _arguments.is_integer(batch_size) or batch_size < 1:
        raise ValueError(
            "`batch_size` must be an integer >= 1. Received: "
            f"batch_size={batch_size!r}"
        )
    noise = np.asarray(noise, "float32")
    fresh = np.random.default_rng(seed)
    extra = [
        fresh.standard_normal(noise.shape).astype("float32") for _ in sigmas[1:]
    ]
    batches = []
    for start in range(0, len(noise), batch_size):
        rows = slice(start, start + batch_size)
        x = ops.convert_to_tensor(noise[rows] * sigmas[0])
        image = None
        for k, sigma in enumerate(sigmas):
            if image is not None:
                scale = float(np.sqrt(sigma**2 - sigma_min**2))
                x = image + scale * ops.convert_to_tensor(extra[k - 1][rows])
            image = consistency_function(
                model, x, sigma, sigma_min, SIGMA_DATA, training=False
            )
            if clip:
                image = ops.clip(image, -1.0, 1.0)
        batches.append(keras.ops.convert_to_numpy(image))
    return np.concatenate(batches) if batches else noise
