"""An independent float64 NumPy re-implementation of DMD2's two losses.

Written from `EDMGuidance.compute_distribution_matching_loss` and
`compute_loss_fake` of `tianweiy/DMD2` (`main/edm/edm_guidance.py`): the
flipped Karras levels, the one-step generator `D(σ_max·z, σ_max)`, the
generator's gradient `(p_real − p_fake) / mean|p_real|` through
`½·mse(x, x − grad)`, and the fake score's `(1/σ² + 1/σ_d²)`-weighted
denoising error; the v-prediction models are EDM denoisers at
`σ_d = 1`, called as black boxes (`consistency_reference.denoiser`).
"""

import numpy as np

from tests.diffusion import consistency_reference


def levels(n=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """The official `karras_sigmas` buffer: small first."""
    return consistency_reference.sigmas(n, sigma_min, sigma_max, rho)[::-1]


def generate(generator, noise, sigma_max=80.0):
    x = np.float64(noise) * sigma_max
    return consistency_reference.denoiser(generator, x, sigma_max)


def _col(values):
    return np.reshape(values, (-1, 1, 1, 1))


def generator_gradient(teacher, fake, images, eps, sigma):
    """`grad` of `compute_distribution_matching_loss`, per pixel."""
    noisy = images + _col(sigma) * eps
    real = consistency_reference.denoiser(teacher, noisy, sigma)
    fake = consistency_reference.denoiser(fake, noisy, sigma)
    p_real, p_fake = images - real, images - fake
    weight = np.abs(p_real).mean(axis=(1, 2, 3), keepdims=True)
    return np.nan_to_num((p_real - p_fake) / weight)


def generator_loss(teacher, fake, images, eps, sigma):
    """Per sample: `½·mean((x − (x − grad))²)`, the loss whose gradient
    with respect to `x` is `grad` over the pixel count."""
    grad = generator_gradient(teacher, fake, images, eps, sigma)
    return 0.5 * (grad**2).mean(axis=(1, 2, 3))


def fake_loss(fake, images, eps, sigma):
    """`compute_loss_fake`'s per-sample error, `σ_d = 1`."""
    noisy = images + _col(sigma) * eps
    estimate = consistency_reference.denoiser(fake, noisy, sigma)
    weights = _col(sigma**-2.0 + 1.0)
    return (weights * (estimate - images) ** 2).mean(axis=(1, 2, 3))
