import keras
from keras import ops

from keras_selfdistill._arguments import check_positive_int
from keras_selfdistill._ddim import CosineSchedule
from keras_selfdistill._ddim import alpha_sigma
from keras_selfdistill._ddim import ddim_step
from keras_selfdistill._ddim import denoise
from keras_selfdistill._ddim import per_sample
from keras_selfdistill.teachers.frozen_model import FrozenModel


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class DDIM(FrozenModel):
    """Two DDIM steps of a frozen diffusion model, as one student step's target.

    The teacher of progressive distillation: a v-prediction model sampled
    with `num_steps` deterministic DDIM steps teaches a student to sample
    with `num_steps / 2`. For a noisy image `z_t` at the student's time
    `t = (i + 1) / (num_steps / 2)`, the teacher runs two of its own steps,
    `t → t − ½Δ → s = t − Δ`, and returns the clean image `x̃` for which
    one DDIM step of the student from `z_t` lands exactly on the teacher's
    `z_s`:

        x̃ = (z_s − (σ_s/σ_t)·z_t) / (α_s − (σ_s/σ_t)·α_t),

    except at the student's last step (`i = 0`, `s = 0`), where the target
    is the teacher's `x̂` after its second step, as in the official code.
    The `keras_selfdistill.terms.Denoising` term regresses the student on
    it. The model is frozen and called with `training=False`, with
    unclipped `x̂` (the official `clip_x=False` during distillation).

    Pass the diffusion model to distil: the moving average of the base
    model's weights (Keras's optimizer `use_ema=True` leaves them in the
    model at the end of `fit`) for the first round, then each round's
    student (`keras_selfdistill.diffusion.progressive_distillation` does
    this).

    Reference:

    - [Salimans & Ho, 2022](https://arxiv.org/abs/2202.00512), algorithm 2;
      `dpm.Model.training_losses` of the official code
      (`google-research/diffusion_distillation`), whose discrete times,
      half steps, target and `i = 0` case this follows.

    Args:
        model: The frozen v-prediction model, called as
            `model([z, logsnr])`.
        num_steps: The teacher's number of sampler steps, even; the student
            learns to sample in `num_steps // 2`.
        schedule: The `keras_selfdistill.diffusion.CosineSchedule` the model
            was trained with. Defaults to `CosineSchedule()`.
        name: Name of the layer. Defaults to `"ddim"`.

    Example:

    ```python
    teacher = keras_selfdistill.teachers.DDIM(base_model, num_steps=16)
    term = keras_selfdistill.terms.Denoising(teacher)
    ```
    """

    def __init__(self, model, num_steps, schedule=None, name=None, **kwargs):
        kwargs.pop("from_logits", None)
        super().__init__(model, from_logits=None, name=name, **kwargs)
        check_positive_int("DDIM", "num_steps", num_steps)
        if num_steps % 2:
            raise ValueError(
                "The DDIM teacher takes two of its steps for each student "
                "step, so `num_steps` must be even (16 teaches a student to "
                f"sample in 8). Received: num_steps={num_steps}"
            )
        if schedule is not None and not isinstance(schedule, CosineSchedule):
            raise TypeError(
                "`schedule` must be a "
                "`keras_selfdistill.diffusion.CosineSchedule`. Received: "
                f"schedule={schedule!r}"
            )
        self.num_steps = int(num_steps)
        self.schedule = CosineSchedule() if schedule is None else schedule

    @property
    def student_steps(self):
        """The number of steps of the student's sampler, `num_steps // 2`."""
        return self.num_steps // 2

    def targets(self, x, y_pred, temperature):
        raise TypeError(
            f"The DDIM teacher '{self.name}' gives target images for "
            "`keras_selfdistill.terms.Denoising`, not logits. Use it in that "
            "term. Received: a call for logits"
        )

    def denoising_targets(self, z, i):
        """The target `x̃` of the student's step `i` from `z`, no gradient.

        Args:
            z: Noisy images at the student's time `(i + 1) / student_steps`.
            i: Integer `(batch,)` step indices in `[0, student_steps)`.
        """
        steps = float(self.student_steps)
        u = (ops.cast(i, "float32") + 1.0) / steps
        z = ops.cast(z, "float32")
        z_mid, _ = ddim_step(self.model, z, u, u - 0.5 / steps, self.schedule)
        u_s = u - 1.0 / steps
        x_mid, eps_mid = denoise(
            self.model, z_mid, self.schedule(u - 0.5 / steps)
        )
        alpha_s, sigma_s = per_sample(alpha_sigma(self.schedule(u_s)), z)
        alpha_t, sigma_t = per_sample(alpha_sigma(self.schedule(u)), z)
        z_s = alpha_s * x_mid + sigma_s * eps_mid
        ratio = sigma_s / sigma_t
        target = (z_s - ratio * z) / (alpha_s - ratio * alpha_t)
        (last,) = per_sample([ops.equal(i, 0)], z)
        return ops.stop_gradient(ops.where(last, x_mid, target))

    def get_config(self):
        config = super().get_config()
        config.pop("from_logits", None)
        config["num_steps"] = self.num_steps
        config["schedule"] = keras.saving.serialize_keras_object(self.schedule)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("schedule"), dict):
            config["schedule"] = keras.saving.deserialize_keras_object(
                config["schedule"]
            )
        return super().from_config(config)
