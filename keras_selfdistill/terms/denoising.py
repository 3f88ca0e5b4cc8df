import keras
import numpy as np
from keras import ops

from keras_selfdistill import _arguments
from keras_selfdistill._ddim import CosineSchedule
from keras_selfdistill._ddim import alpha_sigma
from keras_selfdistill._ddim import per_sample
from keras_selfdistill.teachers.ddim import DDIM
from keras_selfdistill.teachers.frozen_model import FrozenModel
from keras_selfdistill.terms.term import Term
from keras_selfdistill.terms.term import draw_for_global_batch

WEIGHTINGS = ("truncated_snr", "snr_plus_one", "snr", "constant")
# Rounding room above |x| = 1 (a float16 or resized image).
_SCALE_SLACK = 1e-3


def check_image_range(name, x):
    """Refuses a first batch of float images outside `[−1, 1]`."""
    if isinstance(x, (dict, list, tuple)) or not hasattr(x, "dtype"):
        return
    values = np.asarray(x)
    if values.dtype.kind != "f" or not values.size:
        return
    low, high = float(values.min()), float(values.max())
    if low < -1.0 - _SCALE_SLACK or high > 1.0 + _SCALE_SLACK:
        hint = (
            "`image / 127.5 - 1` for pixels in [0, 255]"
            if low >= 0.0 and high > 2.0
            else "map the data's own range linearly onto [-1, 1]"
        )
        raise ValueError(
            f"Term '{name}' reads images scaled to [-1, 1], the "
            "range its sampler clips samples to, but the first batch "
            f"spans [{low:.4g}, {high:.4g}]: the model would learn that "
            f"scale. Rescale the images first, e.g. {hint}. Received: "
            f"inputs in [{low:.4g}, {high:.4g}]"
        )


def unconditional_images(name, x, y):
    """The batch's images as float32, refusing labels and integer pixels."""
    if y is not None:
        raise ValueError(
            f"Term '{name}' trains an unconditional diffusion model "
            "on images alone: map the dataset to its images (e.g. "
            "`dataset.map(lambda image, label: image)`). Received: "
            "batches with labels"
        )
    if isinstance(x, (dict, list, tuple)) or len(x.shape) < 2:
        raise ValueError(
            f"Term '{name}' reads batches of images `(batch, ...)`. "
            f"Received: inputs {x!r}"
        )
    if "int" in str(x.dtype):
        raise ValueError(
            f"Term '{name}' reads images scaled to [-1, 1]; integer "
            "pixels (a tfds image's uint8) would be noised as if they "
            "were that scale. Map them first, e.g. `image / 127.5 - 1`. "
            f"Received: inputs of dtype {x.dtype}"
        )
    return ops.cast(x, "float32")


def noise_and_uniform(images, seed_generator):
    """`(ε, u)`: standard normal noise like `images` and a `(batch,)`
    uniform in `[0, 1)`, drawn in that order for the global batch."""
    shape = ops.shape(images)
    eps = draw_for_global_batch(
        lambda s: keras.random.normal(s, seed=seed_generator), shape
    )
    uniform = draw_for_global_batch(
        lambda s: keras.random.uniform(s, seed=seed_generator), shape[:1]
    )
    return eps, uniform


def check_two_inputs(name, student):
    """Refuses a student that is not called as `student([z, logsnr])`."""
    inputs = getattr(student, "inputs", None)
    if inputs is not None and len(inputs) != 2:
        raise ValueError(
            f"The {name} term calls the student as `student([z, "
            f"logsnr])`: '{student.name}' must take two inputs, the "
            "noisy images and their (batch,) log-SNR. Received: "
            f"{len(inputs)} inputs"
        )


def frozen_diffusion_teacher(term, teacher):
    """`teacher` as a `FrozenModel`, or a `TypeError` naming `term`: the
    frozen v-prediction model a one-step term distils."""
    if isinstance(teacher, keras.Model):
        teacher = FrozenModel(teacher, from_logits=None)
    if not isinstance(teacher, FrozenModel):
        raise TypeError(
            f"The {term} term's teacher must be the frozen diffusion model, "
            "a `keras.Model` called as `model([z, logsnr])` (or a "
            f"FrozenModel of one). Received: teacher={teacher!r}"
        )
    return teacher


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class Denoising(Term):
    """Trains a v-prediction diffusion model, alone or from a DDIM teacher.

    Each training step replaces the batch of clean images `x` (scaled to
    `[−1, 1]`) by noisy ones: with `ε ~ N(0, I)` and a time `t`, the
    student is called as `student([z_t, λ(t)])` on `z_t = α_t·x + σ_t·ε`
    and predicts the velocity `v`, from which `x̂ = α_t·z_t − σ_t·v`. The
    loss is a weighted squared error between `x̂` and a target image,
    averaged over pixels and reduced over the batch like a compiled loss:

    - without a teacher, the target is `x` and `t ~ U(0, 1)`: the base
      model's training, in continuous time;
    - with a `keras_selfdistill.teachers.DDIM` teacher, `t = (i + 1) / N`
      for a uniform step `i` of the student's `N = num_steps / 2`, and the
      target is the teacher's `x̃`, which one student step from `z_t`
      turns into the teacher's two-step result: progressive distillation.

    `weighting` is the paper's: `"truncated_snr"` is
    `max(SNR, 1)·‖x̂ − x̃‖²` (the official `snr_trunc`, used for every
    distillation), `"snr_plus_one"` the v-space error
    `(1 + SNR)·‖x̂ − x̃‖² = ‖v̂ − ṽ‖²`, `"snr"` the ε-space error and
    `"constant"` the x-space error. The log-SNR is bounded by the schedule
    (±20 by default), so every weight is finite at both ends of time.

    Compile the distiller without a `loss` and fit it on images alone,
    as floats in `[−1, 1]` (the model is unconditional; labels and
    integer pixels are refused, and so is a first batch with values
    outside `[−1, 1]`, such as floats in `[0, 255]`, which would train a
    model of that scale for the sampler's clipping to cut; images in
    `[0, 1]` cannot be told apart and train a model of that range). The
    noise and times
    are drawn from this term's seed generator, a variable, so a resumed
    run draws what an uninterrupted one does. `evaluate` and
    `validation_data` are refused: measure a sampler by its samples
    (`keras_selfdistill.diffusion.sample` and
    `keras_selfdistill.diffusion.frechet_distance`).

    Reference:

    - [Salimans & Ho, 2022](https://arxiv.org/abs/2202.00512), algorithm
      2 and section 4; `dpm.Model.training_losses` of the official code
      (`google-research/diffusion_distillation`).

    Args:
        teacher: A `keras_selfdistill.teachers.DDIM`, or `None` to train
            on the data. Defaults to `None`.
        schedule: The `keras_selfdistill.diffusion.CosineSchedule`;
            defaults to the teacher's, or `CosineSchedule()`.
        weighting: One of `"truncated_snr"`, `"snr_plus_one"`, `"snr"`,
            `"constant"`. Defaults to `"truncated_snr"`.
        seed: Integer seed of the noise and times. Defaults to `None`.
        weight: Number or schedule multiplying the term. Defaults to `1.0`.
        name: Name of the term. Defaults to `"denoising"`.

    Example:

    ```python
    base = keras_selfdistill.Distiller(
        keras_selfdistill.diffusion.unet(),
        [keras_selfdistill.terms.Denoising()],
    )
    base.compile(optimizer=keras.optimizers.Adam(1e-3, use_ema=True))
    base.fit(images, batch_size=128, epochs=8)
    teacher = keras_selfdistill.teachers.DDIM(base.student, num_steps=16)
    student = keras.models.clone_model(base.student)
    student.set_weights(base.student.get_weights())
    distilled = keras_selfdistill.Distiller(
        student, [keras_selfdistill.terms.Denoising(teacher)])
    distilled.compile(optimizer=keras.optimizers.Adam(1e-4))
    distilled.fit(images, batch_size=128, epochs=2)  # samples in 8 steps
    ```
    """

    rewrites_batch = True

    def __init__(
        self,
        teacher=None,
        schedule=None,
        weighting="truncated_snr",
        seed=None,
        weight=1.0,
        name=None,
        **kwargs,
    ):
        kwargs.pop("xi", None)
        super().__init__(weight=weight, name=name, **kwargs)
        if teacher is not None and not isinstance(teacher, DDIM):
            raise TypeError(
                "The Denoising term's teacher must be a "
                "`keras_selfdistill.teachers.DDIM` (two sampler steps of a "
                "frozen diffusion model), or None to train on the data. "
                f"Received: teacher={teacher!r}"
            )
        if schedule is not None and not isinstance(schedule, CosineSchedule):
            raise TypeError(
                "`schedule` must be a "
                "`keras_selfdistill.diffusion.CosineSchedule`. Received: "
                f"schedule={schedule!r}"
            )
        if (
            teacher is not None
            and schedule is not None
            and schedule.get_config() != teacher.schedule.get_config()
        ):
            raise ValueError(
                "The term's schedule differs from its teacher's, so the "
                "student would learn other times than the teacher steps "
                f"through. Received: schedule={schedule!r}, teacher "
                f"schedule={teacher.schedule!r}"
            )
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"`weighting` must be one of {WEIGHTINGS}. Received: "
                f"weighting={weighting!r}"
            )
        if seed is not None and not _arguments.is_integer(seed):
            raise TypeError(
                f"`seed` must be an integer or None. Received: seed={seed!r}"
            )
        self.teacher = teacher
        if schedule is None:
            schedule = teacher.schedule if teacher else CosineSchedule()
        self.schedule = schedule
        self.weighting = weighting
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def teachers(self):
        return [] if self.teacher is None else [self.teacher]

    @property
    def reads_logits(self):
        return False

    @property
    def evaluates(self):
        return False

    def attach(self, student):
        check_two_inputs("Denoising", student)

    def check_batch(self, x):
        check_image_range(self.name, x)

    def rewrite_batch(self, x, y, sample_weight):
        images = unconditional_images(self.name, x, y)
        eps, uniform = noise_and_uniform(images, self.seed_generator)
        if self.teacher is None:
            i, t = None, uniform
        else:
            steps = self.teacher.student_steps
            i = ops.minimum(
                ops.cast(ops.floor(uniform * steps), "int32"), steps - 1
            )
            t = (ops.cast(i, "float32") + 1.0) / steps
        logsnr = self.schedule(t)
        alpha, sigma = per_sample(alpha_sigma(logsnr), images)
        z = alpha * images + sigma * eps
        if self.teacher is None:
            target = images
        else:
            target = self.teacher.denoising_targets(z, i)
        labels = {"z": z, "logsnr": logsnr, "target": target}
        return [z, logsnr], labels, sample_weight

    def compute_loss(self, x, y, y_pred, sample_weight, step, epoch):
        return self.reduce(self.per_sample_loss(y, y_pred), sample_weight)

    def per_sample_loss(self, y, velocity):
        """The weighted error of each sample, from the rewritten labels."""
        z = ops.cast(y["z"], "float32")
        logsnr = ops.cast(y["logsnr"], "float32")
        alpha, sigma = per_sample(alpha_sigma(logsnr), z)
        x = alpha * z - sigma * ops.cast(velocity, "float32")
        axes = tuple(range(1, len(z.shape)))
        error = ops.mean(ops.square(x - ops.cast(y["target"], "float32")), axes)
        snr = ops.exp(logsnr)
        factor = {
            "truncated_snr": ops.maximum(snr, 1.0),
            "snr_plus_one": 1.0 + snr,
            "snr": snr,
            "constant": ops.ones_like(snr),
        }[self.weighting]
        return factor * error

    def get_config(self):
        config = super().get_config()
        config.pop("xi", None)
        config["teacher"] = (
            None
            if self.teacher is None
            else keras.saving.serialize_keras_object(self.teacher)
        )
        config["schedule"] = keras.saving.serialize_keras_object(self.schedule)
        config["weighting"] = self.weighting
        config["seed"] = self.seed
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for name in ("teacher", "schedule"):
            if config.get(name) is not None:
                config[name] = keras.saving.deserialize_keras_object(
                    config[name]
                )
        return super().from_config(config)
