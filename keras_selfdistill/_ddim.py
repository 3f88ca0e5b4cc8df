"""The DDIM update of a v-prediction model and the schedule it reads.

The maths that the DDIM teacher (`keras_selfdistill.teachers.DDIM`), the
denoising term (`keras_selfdistill.terms.Denoising`) and the sampler
(`keras_selfdistill.diffusion.sample`) share, below all three; users reach
`CosineSchedule` as `keras_selfdistill.diffusion.CosineSchedule`.

The model is a Keras model called as `model([z, logsnr])` on noisy images
`z` and their log-SNR `(batch,)`, returning the velocity
`v = α·ε − σ·x` (v-prediction, Salimans & Ho 2022, appendix D).
"""

import math

import keras
from keras import ops

from keras_selfdistill import _arguments


def alpha_sigma(logsnr):
    """`(α, σ)` of the variance-preserving process at log-SNR `logsnr`.

    `z = α·x + σ·ε` with `α² = sigmoid(λ)` and `σ² = sigmoid(−λ)`, so
    `α² + σ² = 1` and `α² / σ² = exp(λ)`.
    """
    logsnr = ops.cast(logsnr, "float32")
    return ops.sqrt(ops.sigmoid(logsnr)), ops.sqrt(ops.sigmoid(-logsnr))


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class CosineSchedule:
    """The continuous-time cosine log-SNR schedule of progressive distillation.

    Maps a time `t ∈ [0, 1]` to the log signal-to-noise ratio
    `λ(t) = −2·log(tan(a·t + b))`, with `b = arctan(exp(−λ_max / 2))` and
    `a = arctan(exp(−λ_min / 2)) − b`, so that `λ(0) = λ_max` (almost clean
    data) and `λ(1) = λ_min` (almost pure noise). With the default bounds it
    is the cosine schedule of Nichol & Dhariwal (`α_t = cos(π t / 2)`)
    truncated at both ends, where `α` or `σ` would be exactly 0 and a
    sampler would divide by it. The samplers, teachers and terms of
    `keras_selfdistill.diffusion` read the same schedule.

    Reference:

    - [Salimans & Ho, 2022](https://arxiv.org/abs/2202.00512), and
      `diffusion_distillation/schedules.py` of their official code
      (`_logsnr_schedule_cosine`, bounds ±20 in every configuration).

    Args:
        logsnr_min: Log-SNR at `t = 1`. Defaults to `-20.0`.
        logsnr_max: Log-SNR at `t = 0`. Defaults to `20.0`.

    Example:

    ```python
    schedule = keras_selfdistill.diffusion.CosineSchedule()
    logsnr = schedule(keras.ops.convert_to_tensor([0.0, 0.5, 1.0]))
    ```
    """

    def __init__(self, logsnr_min=-20.0, logsnr_max=20.0):
        for name, value in (
            ("logsnr_min", logsnr_min),
            ("logsnr_max", logsnr_max),
        ):
            if not _arguments.is_number(value) or not math.isfinite(value):
                raise TypeError(
                    f"`{name}` must be a finite number. Received: "
                    f"{name}={value!r}"
                )
        if not logsnr_min < logsnr_max:
            raise ValueError(
                "`logsnr_min` must be below `logsnr_max`: time runs from "
                "clean data (high SNR) to noise (low SNR). Received: "
                f"logsnr_min={logsnr_min}, logsnr_max={logsnr_max}"
            )
        self.logsnr_min = float(logsnr_min)
        self.logsnr_max = float(logsnr_max)
        self._b = math.atan(math.exp(-0.5 * self.logsnr_max))
        # arctan(exp(λ_min / 2)) = π/2 − arctan(exp(−λ_min / 2)).
        self._c = math.atan(math.exp(0.5 * self.logsnr_min))
        self._a = math.pi / 2 - self._c - self._b

    def __call__(self, t):
        t = ops.cast(t, "float32")
        # −2·log(tan(a·t + b)), written from whichever end is nearer: the
        # angle approaches π/2 at t = 1, where float32 cannot resolve
        # π/2 − angle (4.5e-5 at λ_min = −20), and tan(π/2 − φ) = 1/tan(φ).
        early = -2.0 * ops.log(ops.tan(self._a * t + self._b))
        late = 2.0 * ops.log(ops.tan(self._a * (1.0 - t) + self._c))
        return ops.where(t <= 0.5, early, late)

    def get_config(self):
        return {"logsnr_min": self.logsnr_min, "logsnr_max": self.logsnr_max}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (
            f"CosineSchedule(logsnr_min={self.logsnr_min}, "
            f"logsnr_max={self.logsnr_max})"
        )


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
