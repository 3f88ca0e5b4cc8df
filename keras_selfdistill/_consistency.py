"""The maths of consistency models over a v-prediction diffusion model.

What `keras_selfdistill.terms.ConsistencyDistillation` and
`keras_selfdistill.diffusion.consistency_sample` share. Consistency models
are written in the variance-exploding form of Karras et al. (EDM): an image
`x` noised to level `σ` is `x_σ = x + σ·ε`. A v-prediction model of the
variance-preserving process reads the same point as `z = x_σ / √(1 + σ²)`
at log-SNR `λ = −2·log σ`, and its clean estimate is EDM's denoiser with
`σ_data = 1`: `x̂ = c_skip·x_σ + c_out·F` with `c_skip = 1 / (1 + σ²)`,
`c_out = σ / √(1 + σ²)` and `F = −v`. The consistency function keeps that
`F` and moves the boundary to `σ_min`:

    f(x_σ, σ) = c_skip(σ)·x_σ + c_out(σ)·F,
    c_skip = σ_d² / ((σ − σ_min)² + σ_d²),
    c_out = σ_d·(σ − σ_min) / √(σ_d² + σ²),

so `f(x, σ_min) = x`, and a student initialised from the teacher starts
near the teacher's denoiser.
"""

import math

import numpy as np
from keras import ops

from keras_selfdistill import _arguments
from keras_selfdistill._ddim import CosineSchedule
from keras_selfdistill._ddim import denoise
from keras_selfdistill._ddim import per_sample

#: v-prediction is EDM's parameterisation at this σ_data (module docstring).
SIGMA_DATA = 1.0


def checked_sigma_range(sigma_range):
    """`(σ_min, σ_max)` as floats, or a `ValueError`: positive, increasing,
    and within the noise levels `σ = exp(−λ/2)` of `CosineSchedule()`'s
    log-SNRs, where the library's diffusion models are trained."""
    sigma_range = tuple(sigma_range)
    if (
        len(sigma_range) != 2
        or not all(_arguments.is_number(s) for s in sigma_range)
        or not 0.0 < sigma_range[0] < sigma_range[1]
    ):
        raise ValueError(
            "`sigma_range` must be `(sigma_min, sigma_max)` with "
            "0 < sigma_min < sigma_max. Received: "
            f"sigma_range={sigma_range!r}"
        )
    schedule = CosineSchedule()
    low = math.exp(-0.5 * schedule.logsnr_max)
    high = math.exp(-0.5 * schedule.logsnr_min)
    if sigma_range[0] < low or sigma_range[1] > high:
        raise ValueError(
            "`sigma_range` reaches noise levels outside those of the "
            "teacher's schedule (`CosineSchedule()`: log-SNR within "
            f"±20, σ in [{low:.3g}, {high:.3g}]), where the teacher "
            "was never trained. Received: "
            f"sigma_range={sigma_range!r}"
        )
    return tuple(float(s) for s in sigma_range)


def karras_sigmas(num_scales, sigma_min, sigma_max, rho):
    """The `num_scales` noise levels of EDM, from `σ_max` down to `σ_min`:
    `(σ_max^{1/ρ} + i/(N − 1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ`, float64."""
    index = np.arange(num_scales, dtype="float64") / (num_scales - 1)
    top, bottom = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (top + index * (bottom - top)) ** rho


def _per_sample_sigma(x, sigma):
    return ops.cast(sigma, "float32") * ops.ones((ops.shape(x)[0],))


def velocity_inputs(x, sigma):
    """The v-prediction model's `[z, λ]` for `x_σ` at `σ` (a scalar or
    `(batch,)`): `z = x_σ / √(1 + σ²)` and `λ = −2·log σ`."""
    x = ops.cast(x, "float32")
    sigma = _per_sample_sigma(x, sigma)
    (scale,) = per_sample([1.0 / ops.sqrt(1.0 + ops.square(sigma))], x)
    return [x * scale, -2.0 * ops.log(sigma)]


def consistency_output(velocity, x, sigma, sigma_min, sigma_data):
    """`f(x_σ, σ)` from the model's velocity at `velocity_inputs(x, σ)`."""
    x = ops.cast(x, "float32")
    sigma = _per_sample_sigma(x, sigma)
    shifted = sigma - sigma_min
    skip = sigma_data**2 / (ops.square(shifted) + sigma_data**2)
    out = sigma_data * shifted / ops.sqrt(sigma_data**2 + ops.square(sigma))
    skip, out = per_sample([skip, out], x)
    return skip * x - out * ops.cast(velocity, "float32")


def consistency_function(model, x, sigma, sigma_min, sigma_data, training):
    """`f(x_σ, σ)` of the consistency model `model`."""
    velocity = model(velocity_inputs(x, sigma), training=training)
    return consistency_output(velocity, x, sigma, sigma_min, sigma_data)


def heun_step(model, x, sigma, next_sigma):
    """One step of Heun's method on the probability-flow ODE
    `dx/dσ = (x − D(x, σ)) / σ` of the frozen diffusion model, from `σ` to
    `next_sigma` (`(batch,)` each), as the official `heun_solver` of
    consistency distillation takes it: two evaluations of the denoiser
    `D` (the model's unclipped `x̂`), no gradient."""
    x = ops.cast(x, "float32")
    now, later = per_sample([sigma, next_sigma], x)

    def slope(point, level):
        z, logsnr = velocity_inputs(point, level)
        clean, _ = denoise(model, z, logsnr)
        return (point - clean) / per_sample([level], point)[0]

    first = slope(x, sigma)
    euler = x + first * (later - now)
    second = slope(euler, next_sigma)
    return ops.stop_gradient(x + 0.5 * (first + second) * (later - now))


def pseudo_huber_constant(shape):
    """iCT's `c = 0.00054·√d` for images of `shape` (`d` values each)."""
    return 0.00054 * math.sqrt(float(np.prod(shape)))
