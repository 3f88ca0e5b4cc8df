"""An independent float64 NumPy re-implementation of the official code.

Written from `dpm.py` and `schedules.py` of
`google-research/diffusion_distillation` (the cosine log-SNR schedule,
`_run_model` for v-prediction with `predict_eps_from_x`, the two-step
teacher of `training_losses` and `ddim_step`), calling the Keras model as a
black box on float32 inputs.
"""

import numpy as np


def logsnr(t, logsnr_min=-20.0, logsnr_max=20.0):
    b = np.arctan(np.exp(-0.5 * logsnr_max))
    a = np.arctan(np.exp(-0.5 * logsnr_min)) - b
    return -2.0 * np.log(np.tan(a * np.float64(t) + b))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def alpha_sigma(lam):
    return np.sqrt(sigmoid(lam)), np.sqrt(sigmoid(-lam))


def _column(values, rank):
    return np.reshape(values, (-1,) + (1,) * (rank - 1))


def run_model(model, z, lam, clip=False):
    """`(x, eps)` as the official `_run_model` derives them from `v`."""
    lam = np.broadcast_to(np.float64(lam), (len(z),))
    v = np.asarray(
        model([z.astype("float32"), lam.astype("float32")], training=False),
        "float64",
    )
    alpha, sigma = (_column(v_, z.ndim) for v_ in alpha_sigma(lam))
    x = alpha * z - sigma * v
    if clip:
        x = np.clip(x, -1, 1)
    return x, (z - alpha * x) / sigma


def teacher_target(model, z, i, student_steps):
    """`(x_target, z_teacher)` of `training_losses`'s distillation branch."""
    rank = z.ndim
    u = (np.float64(i) + 1) / student_steps
    lam = logsnr(u)
    x, eps = run_model(model, z, lam)
    u_mid = u - 0.5 / student_steps
    a_mid, s_mid = (_column(v, rank) for v in alpha_sigma(logsnr(u_mid)))
    z_mid = a_mid * x + s_mid * eps
    x, eps = run_model(model, z_mid, logsnr(u_mid))
    u_s = u - 1.0 / student_steps
    lam_s = logsnr(u_s)
    a_s, s_s = (_column(v, rank) for v in alpha_sigma(lam_s))
    z_teacher = a_s * x + s_s * eps
    a_t = _column(np.sqrt(sigmoid(lam)), rank)
    frac = _column(
        np.exp(0.5 * (np.logaddexp(0, lam) - np.logaddexp(0, lam_s))), rank
    )
    target = (z_teacher - frac * z) / (a_s - frac * a_t)
    target = np.where(_column(np.asarray(i) == 0, rank), x, target)
    return target, z_teacher


def ddim_sample(model, noise, num_steps, clip=True):
    z = np.float64(noise)
    for i in reversed(range(num_steps)):
        lam_t = logsnr((i + 1) / num_steps)
        lam_s = logsnr(i / num_steps)
        x, eps = run_model(model, z, lam_t, clip=clip)
        alpha_s, sigma_s = alpha_sigma(lam_s)
        z = x if i == 0 else alpha_s * x + sigma_s * eps
    return z


def unet(keras, ksd, seed, shape=(8, 8, 1)):
    """A tiny UNet whose zero-initialised convolutions are not zero.

    The output layer and each block's second convolution start at zero,
    which would make the model's output 0 and blind to its time input.
    """
    keras.utils.set_random_seed(seed)
    model = ksd.diffusion.unet(shape, widths=(4, 8), embedding_dim=8)
    randomise_zero_layers(keras, model, seed, stddev=0.3)
    return model


def randomise_zero_layers(keras, model, seed, stddev):
    for layer in model.layers:
        if layer.name == "velocity" or layer.name.endswith("_conv2"):
            layer.kernel.assign(
                keras.random.normal(
                    layer.kernel.shape, stddev=stddev, seed=seed
                )
            )
