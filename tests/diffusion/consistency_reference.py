"""An independent float64 NumPy re-implementation of consistency distillation.

Written from `cm/karras_diffusion.py` of `openai/consistency_models`
(`consistency_losses` with a teacher, its `heun_solver`, `get_scalings_for_
boundary_condition`, `stochastic_iterative_sampler`) and EDM's noise levels,
with the v-prediction model as EDM's denoiser at `σ_data = 1`; the Keras
model is called as a black box on float32 inputs.
"""

import numpy as np


def sigmas(num_scales, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    ramp = np.linspace(0.0, 1.0, num_scales)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (high + ramp * (low - high)) ** rho


def _col(values, x):
    return np.reshape(np.broadcast_to(values, (len(x),)), (-1, 1, 1, 1))


def velocity(model, x, sigma):
    """The model's `v` at the VE point `x` of noise level `sigma`."""
    sigma = np.broadcast_to(np.float64(sigma), (len(x),))
    z = x / np.sqrt(1.0 + _col(sigma, x) ** 2)
    out = model(
        [z.astype("float32"), (-2.0 * np.log(sigma)).astype("float32")],
        training=False,
    )
    return np.asarray(out, "float64")


def denoiser(model, x, sigma):
    """EDM's `D(x, σ) = c_skip·x + c_out·F` with `σ_d = 1`, `F = −v`."""
    s = _col(sigma, x)
    return x / (1.0 + s**2) - s / np.sqrt(1.0 + s**2) * velocity(
        model, x, sigma
    )


def consistency(model, x, sigma, sigma_min=0.002, sigma_data=1.0):
    s = _col(sigma, x)
    c_skip = sigma_data**2 / ((s - sigma_min) ** 2 + sigma_data**2)
    c_out = (s - sigma_min) * sigma_data / np.sqrt(s**2 + sigma_data**2)
    return c_skip * x + c_out * -velocity(model, x, sigma)


def heun(model, x, t, next_t):
    t, next_t = _col(t, x), _col(next_t, x)
    d = (x - denoiser(model, x, t[:, 0, 0, 0])) / t
    samples = x + d * (next_t - t)
    next_d = (samples - denoiser(model, samples, next_t[:, 0, 0, 0])) / next_t
    return x + (d + next_d) * (next_t - t) / 2


def loss(student, target_model, teacher, images, eps, n, grid, distance):
    """Per-sample loss of `consistency_losses` at step indices `n`."""
    t, t2 = grid[n], grid[n + 1]
    x_t = np.float64(images) + _col(t, images) * eps
    estimate = consistency(student, x_t, t)
    target = consistency(target_model, heun(teacher, x_t, t, t2), t2)
    diff = (estimate - target) ** 2
    if distance == "l2":
        return diff.mean(axis=(1, 2, 3))
    c = 0.00054 * np.sqrt(np.prod(images.shape[1:]))
    return np.sqrt(diff.sum(axis=(1, 2, 3)) + c**2) - c


def multistep(model, noise, levels, extra, sigma_min=0.002):
    x = np.float64(noise) * levels[0]
    image = np.clip(consistency(model, x, levels[0]), -1, 1)
    for sigma, fresh in zip(levels[1:], extra):
        x = image + np.sqrt(sigma**2 - sigma_min**2) * fresh
        image = np.clip(consistency(model, x, sigma), -1, 1)
    return image
