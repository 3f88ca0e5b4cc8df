import keras
import numpy as np
from keras import ops

from keras_selfdistill import _arguments
from keras_selfdistill import _internals
from keras_selfdistill._consistency import SIGMA_DATA
from keras_selfdistill._consistency import checked_sigma_range
from keras_selfdistill._consistency import consistency_function
from keras_selfdistill._consistency import consistency_output
from keras_selfdistill._consistency import karras_sigmas
from keras_selfdistill._consistency import velocity_inputs
from keras_selfdistill._ddim import per_sample
from keras_selfdistill.teachers.teacher import trainable_copy
from keras_selfdistill.terms.denoising import check_two_inputs
from keras_selfdistill.terms.denoising import frozen_diffusion_teacher
from keras_selfdistill.terms.term import Term
from keras_selfdistill.terms.term import draw_for_global_batch

_RHO = 7.0
# The largest relative gap between the fake and real denoisers at the start.
_FAKE_START_GAP = 0.5


def _denoised(model, x, sigma, training=False):
    """EDM's denoiser `D(x_σ, σ)` of a v-prediction model (`σ_data = 1`)."""
    return consistency_function(model, x, sigma, 0.0, SIGMA_DATA, training)


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class DistributionMatching(Term):
    """Distils a diffusion model into a one-step generator (DMD2).

    Distribution matching distillation trains the generator `G` (the
    student) so that the distribution of its samples matches the
    teacher's: the gradient of their KL divergence at a sample noised to
    level `σ` is the difference of two scores, the teacher's ("real") and
    that of a second diffusion model, the fake score, trained online on
    the generator's samples. Each training step:

    1. updates the fake score `fake_updates` times (the two time-scale
       update rule of DMD2), each time on the generator's samples from
       fresh noise, with the diffusion loss EDM's weighting gives,
       `(1/σ² + 1)·‖D_fake(x + σ·ε, σ) − x‖²` at `σ` drawn uniformly from
       `num_train_timesteps` Karras levels, by the term's own optimizer;
    2. updates the generator: for each noise `z` of the batch,
       `x = G(z) = D_G(σ_max·z, σ_max)`, noised to `x + σ·ε` at a level
       drawn uniformly between the `min_step_percent` and
       `max_step_percent` positions of the same levels; the gradient
       `(D_fake − D_real) / mean|x − D_real|` (DMD's weighting) reaches
       `x` through `½·‖x − sg(x − grad)‖²`, averaged over pixels.

    With `regression_weight`, DMD's regression loss is added: the
    generator's sample from a teacher's noise is regressed on the
    teacher's image for that noise (DMD uses LPIPS, whose weights cannot
    be downloaded here: the squared error, averaged over pixels).

    The generator, the teacher and the fake score are v-prediction
    models called as `model([z, λ])`, read as EDM denoisers with
    `σ_data = 1` (`x̂ = x_σ/(1 + σ²) − σ/√(1 + σ²)·v`), as
    `keras_selfdistill.terms.ConsistencyDistillation` reads them. Start
    the generator from the teacher's weights; the fake score starts as a
    copy of the teacher (DMD2 initialises both so). Sample the generator
    with `keras_selfdistill.diffusion.consistency_sample(generator, noise,
    sigmas=(σ_max,), sigma_min=0.0)`.

    Fit on the generator's inputs: standard normal noise shaped like the
    images (inputs alone; with `regression_weight`, pairs `(noise, image)`
    from the teacher's sampler). Compile without a `loss`: the term is the
    loss. The fake score's loss is logged as `<name>_fake_loss`. The
    fake score and its optimizer are the term's own: saved with the
    distiller, restored by `BackupAndRestore`, replicated under
    `tf.distribute`.

    Where this differs from the official code: in DMD2 an iteration
    updates the fake score once and, every fifth iteration, first the
    generator; here one step makes the fake score's `fake_updates`
    updates and then the generator's, so the generator's first update
    already sees a trained fake score (the official first one sees the
    teacher's copy and gets a zero gradient). The fake updates draw their
    own noise (the official one shares it with the generator's update in
    one of five iterations). DMD2's GAN loss (a classifier on the fake
    score's bottleneck) and its multi-step generator are not implemented.

    Reference:

    - [Yin et al., 2024](https://arxiv.org/abs/2405.14867) (DMD2), and
      `EDMGuidance.compute_distribution_matching_loss` and
      `compute_loss_fake` of the official code (`tianweiy/DMD2`,
      `main/edm/edm_guidance.py`): the level grid and its bounds, the
      weighting, the fake loss, the update ratio (5 on ImageNet);
    - [Yin et al., 2023](https://arxiv.org/abs/2311.18828) (DMD), the
      regression loss.

    Args:
        teacher: The frozen v-prediction diffusion model (a `keras.Model`
            called as `model([z, logsnr])`, or a
            `keras_selfdistill.teachers.FrozenModel` of one): the real
            score.
        fake_score: The fake score's model, with the teacher's inputs and
            output. Defaults to `None`: a copy of the teacher.
        fake_optimizer: Its optimizer (an instance or an identifier).
            Defaults to `None`: `keras.optimizers.Adam(1e-4)`. DMD2 gives
            both models the same settings.
        fake_updates: Fake-score updates per generator update. Defaults
            to `5` (DMD2 on ImageNet).
        sigma_range: `(σ_min, σ_max)` of the levels; the generator maps
            noise at `σ_max`. Defaults to `(0.002, 80.0)`.
        num_train_timesteps: Number of Karras levels (`ρ = 7`). Defaults
            to `1000`.
        min_step_percent: Lowest position of the generator loss's levels,
            a fraction of `num_train_timesteps`. Defaults to `0.02`.
        max_step_percent: Highest position. Defaults to `0.98`.
        regression_weight: Weight of DMD's regression loss. Defaults to
            `0.0` (DMD2, none; DMD used 0.25).
        seed: Integer seed of the noise and levels. Defaults to `None`.
        weight: Number or schedule multiplying the term. Defaults to `1.0`.
        name: Name of the term. Defaults to `"distribution_matching"`.

    Example:

    ```python
    generator = keras.models.clone_model(base_model)
    generator.set_weights(base_model.get_weights())
    term = keras_selfdistill.terms.DistributionMatching(
        base_model, fake_optimizer=keras.optimizers.Adam(1e-4))
    distiller = keras_selfdistill.Distiller(generator, [term])
    distiller.compile(optimizer=keras.optimizers.Adam(1e-4))
    noise = numpy.random.default_rng(0).normal(size=(60000, 28, 28, 1))
    distiller.fit(noise.astype("float32"), batch_size=128, epochs=1)
    images = keras_selfdistill.diffusion.consistency_sample(
        generator, noise[:16], sigma_min=0.0)
    ```
    """

    rewrites_batch = True
    trains_own = True
    own_metrics = ("fake_loss",)

    def __init__(
        self,
        teacher,
        fake_score=None,
        fake_optimizer=None,
        fake_updates=5,
        sigma_range=(0.002, 80.0),
        num_train_timesteps=1000,
        min_step_percent=0.02,
        max_step_percent=0.98,
        regression_weight=0.0,
        seed=None,
        weight=1.0,
        name=None,
        **kwargs,
    ):
        kwargs.pop("xi", None)
        super().__init__(weight=weight, name=name, **kwargs)
        teacher = frozen_diffusion_teacher("DistributionMatching", teacher)
        if fake_score is None:
            fake_score = trainable_copy(teacher.model)
        if not isinstance(fake_score, keras.Model):
            raise TypeError(
                "`fake_score` must be a `keras.Model` with the teacher's "
                f"inputs and output. Received: fake_score={fake_score!r}"
            )
        for argument, value in (
            ("fake_updates", fake_updates),
            ("num_train_timesteps", num_train_timesteps),
        ):
            if not _arguments.is_integer(value) or value < 1:
                raise ValueError(
                    f"`{argument}` must be an integer >= 1. Received: "
                    f"{argument}={value!r}"
                )
        if not (
            _arguments.is_number(min_step_percent)
            and _arguments.is_number(max_step_percent)
            and 0.0 <= min_step_percent <= max_step_percent <= 1.0
        ):
            raise ValueError(
                "`min_step_percent` and `max_step_percent` must be numbers "
                "with 0 <= min_step_percent <= max_step_percent <= 1. "
                f"Received: min_step_percent={min_step_percent!r}, "
                f"max_step_percent={max_step_percent!r}"
            )
        if not _arguments.is_number(regression_weight) or not (
            regression_weight >= 0.0
        ):
            raise ValueError(
                "`regression_weight` must be a number >= 0. Received: "
                f"regression_weight={regression_weight!r}"
            )
        if seed is not None and not _arguments.is_integer(seed):
            raise TypeError(
                f"`seed` must be an integer or None. Received: seed={seed!r}"
            )
        self.teacher = teacher
        self.fake_score = fake_score
        self.fake_optimizer = keras.optimizers.get(
            keras.optimizers.Adam(1e-4)
            if fake_optimizer is None
            else fake_optimizer
        )
        self.fake_updates = int(fake_updates)
        self.sigma_range = checked_sigma_range(sigma_range)
        self.num_train_timesteps = int(num_train_timesteps)
        self.min_step_percent = float(min_step_percent)
        self.max_step_percent = float(max_step_percent)
        self.regression_weight = float(regression_weight)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        # Small first, as the official `karras_sigmas` buffer.
        self.sigmas = karras_sigmas(
            self.num_train_timesteps, *self.sigma_range, rho=_RHO
        )[::-1].copy()
        # The official bounds: `randint(min_step, min(max_step + 1, N))`.
        self._dm_steps = (
            int(self.min_step_percent * self.num_train_timesteps),
            min(
                int(self.max_step_percent * self.num_train_timesteps) + 1,
                self.num_train_timesteps,
            ),
        )
        if self._dm_steps[0] >= self._dm_steps[1]:
            raise ValueError(
                "`min_step_percent` leaves no level below `max_step_percent` "
                f"among {self.num_train_timesteps}. Received: "
                f"min_step_percent={min_step_percent!r}, "
                f"max_step_percent={max_step_percent!r}"
            )

    @property
    def teachers(self):
        return [self.teacher]

    @property
    def reads_logits(self):
        return False

    @property
    def evaluates(self):
        return False

    def attach(self, student):
        check_two_inputs("DistributionMatching", student)
        teacher = self.teacher.model
        check_two_inputs("DistributionMatching teacher's", teacher)
        check_two_inputs("DistributionMatching fake score's", self.fake_score)
        for what, model in (
            ("teacher", teacher),
            ("fake score", self.fake_score),
        ):
            if tuple(model.output_shape) != tuple(student.output_shape):
                raise ValueError(
                    f"The generator and the {what} must all predict the "
                    "velocity of the same images: their outputs differ. "
                    f"Received: generator output {student.output_shape}, "
                    f"{what} output {model.output_shape}"
                )
        shapes = [tuple(i.shape) for i in getattr(student, "inputs", [])]
        if shapes and shapes[0] != tuple(student.output_shape):
            raise ValueError(
                "A one-step generator maps noise to images: the student's "
                "output must have the shape of its image input. Received: "
                f"input {shapes[0]}, output {student.output_shape}"
            )
        trained = list(self.fake_score.trainable_variables)
        if not trained:
            raise ValueError(
                "The fake score has no trainable weights, so it cannot "
                "follow the generator. Pass a trainable model (a frozen "
                "teacher's copy: set `fake_score.trainable = True`). "
                f"Received: fake_score={self.fake_score.name!r}"
            )
        self.teacher.attach(student)
        self._fake_variables = trained
        self.fake_optimizer = self.add_optimizer(self.fake_optimizer, trained)

    def check_batch(self, x):
        if isinstance(x, (dict, list, tuple)):
            raise ValueError(
                f"Term '{self.name}' reads the generator's noise as the "
                f"inputs, one array. Received: inputs {x!r}"
            )
        values = np.asarray(keras.ops.convert_to_numpy(x), "float64")
        # 64 standard normal values all within ±1: p = 0.68^64 < 2e-11.
        if values.size >= 64 and np.abs(values).max() <= 1.0:
            raise ValueError(
                f"Term '{self.name}' reads the generator's inputs, standard "
                "normal noise; the first batch lies within [−1, 1], like "
                "images. Fit on noise (with `regression_weight`, pairs "
                "`(noise, image)`). Received: values in "
                f"[{values.min():.3g}, {values.max():.3g}]"
            )
        if int(_internals.to_numpy(self.fake_optimizer.iterations)) == 0:
            self._check_fake_score(values[:8].astype("float32"))

    def _check_fake_score(self, noise):
        """Refuses a fake score that does not start as the real one.

        DMD2 starts the fake score from the teacher: their denoisers agree,
        and the generator's first gradients are small. One of another
        output parameterisation (noise instead of velocity), or untrained,
        disagrees everywhere.
        """
        teacher = self.teacher.model
        gaps = []
        for sigma in (0.5, 2.0, 20.0):
            real = _denoised(teacher, noise * sigma, sigma)
            fake = _denoised(self.fake_score, noise * sigma, sigma)
            gaps.append(
                float(_internals.to_numpy(ops.mean(ops.abs(fake - real))))
                / max(
                    float(_internals.to_numpy(ops.mean(ops.abs(real)))), 1e-12
                )
            )
        if max(gaps) > _FAKE_START_GAP:
            raise ValueError(
                f"The fake score of term '{self.name}' must start as the "
                "teacher does (DMD2 copies the teacher): its denoiser "
                f"differs from the teacher's by {max(gaps):.0%} of it on the "
                "first batch's noise. A fake score of another output "
                "parameterisation (noise or images instead of velocity), or "
                "an untrained one, is refused. Leave `fake_score=None` for a "
                "copy of the teacher. Received: relative gaps "
                f"{[round(g, 3) for g in gaps]} at σ = 0.5, 2, 20"
            )

    def _normal(self, shape):
        return draw_for_global_batch(
            lambda s: keras.random.normal(s, seed=self.seed_generator), shape
        )

    def _levels(self, batch, low, high):
        """`(batch,)` noise levels at positions uniform in `[low, high)`."""
        uniform = draw_for_global_batch(
            lambda s: keras.random.uniform(s, seed=self.seed_generator),
            (batch,),
        )
        position = ops.minimum(
            ops.cast(ops.floor(uniform * (high - low)), "int32"),
            high - low - 1,
        )
        return ops.take(
            ops.convert_to_tensor(self.sigmas, "float32"), low + position
        )

    def rewrite_batch(self, x, y, sample_weight):
        if isinstance(x, (dict, list, tuple)):
            raise ValueError(
                f"Term '{self.name}' reads the generator's noise as the "
                f"inputs, one array. Received: inputs {x!r}"
            )
        if (y is not None) != (self.regression_weight > 0):
            raise ValueError(
                f"Term '{self.name}' "
                + (
                    "has no regression loss (`regression_weight=0`), so "
                    "it reads noise alone: targets would be ignored. Fit on "
                    "the noise, or set `regression_weight`."
                    if y is not None
                    else "regresses the generator on a teacher's images "
                    "(`regression_weight > 0`): fit on pairs `(noise, "
                    "image)`."
                )
                + f" Received: targets={'given' if y is not None else None}"
            )
        noise = ops.cast(x, "float32")
        sigma_max = self.sigma_range[1]
        start = noise * sigma_max
        eps = self._normal(ops.shape(noise))
        sigma = self._levels(ops.shape(noise)[0], *self._dm_steps)
        labels = {"x": start, "noise": eps, "sigma": sigma}
        if y is not None:
            labels["target"] = ops.cast(y, "float32")
        return velocity_inputs(start, sigma_max), labels, sample_weight

    def train_own(self, student, x, y, sample_weight):
        shape = ops.shape(y["x"])
        total = 0.0
        for _ in range(self.fake_updates):
            start = self._normal(shape) * self.sigma_range[1]
            samples = ops.stop_gradient(
                _denoised(student, start, self.sigma_range[1])
            )
            sigma = self._levels(shape[0], 0, self.num_train_timesteps)
            level = per_sample([sigma], samples)[0]
            noisy = samples + level * self._normal(shape)

            def loss_fn(noisy=noisy, sigma=sigma, samples=samples):
                return self.reduce(
                    self.fake_score_loss(noisy, sigma, samples), None
                )

            total = total + self.minimize(
                self.fake_optimizer, self._fake_variables, loss_fn
            )
        return {"fake_loss": total / self.fake_updates}

    def fake_score_loss(self, noisy, sigma, samples):
        """Each sample's EDM-weighted squared error of the fake score's
        denoiser: `(1/σ² + 1)·‖D_fake(x_σ, σ) − x‖²`, over pixels."""
        estimate = _denoised(self.fake_score, noisy, sigma, training=True)
        square = ops.square(estimate - samples)
        axes = tuple(range(1, len(square.shape)))
        return (1.0 / ops.square(sigma) + 1.0) * ops.mean(square, axes)

    def compute_loss(self, x, y, y_pred, sample_weight, step, epoch):
        return self.reduce(self.per_sample_loss(y, y_pred), sample_weight)

    def per_sample_loss(self, y, velocity):
        """The generator's loss of each sample, from the labels."""
        sigma_max = self.sigma_range[1]
        images = consistency_output(
            velocity, y["x"], sigma_max, 0.0, SIGMA_DATA
        )
        fixed = ops.stop_gradient(images)
        sigma = y["sigma"]
        noisy = fixed + per_sample([sigma], fixed)[0] * y["noise"]
        real = ops.stop_gradient(_denoised(self.teacher.model, noisy, sigma))
        fake = ops.stop_gradient(_denoised(self.fake_score, noisy, sigma))
        axes = tuple(range(1, len(images.shape)))
        scale = ops.mean(ops.abs(fixed - real), axes, keepdims=True)
        gradient = ops.nan_to_num((fake - real) / scale)
        target = ops.stop_gradient(fixed - gradient)
        loss = 0.5 * ops.mean(ops.square(images - target), axes)
        if "target" in y:
            error = ops.mean(ops.square(images - y["target"]), axes)
            loss = loss + self.regression_weight * error
        return loss

    def get_config(self):
        config = super().get_config()
        config.pop("xi", None)
        config.update(
            teacher=keras.saving.serialize_keras_object(self.teacher),
            fake_score=keras.saving.serialize_keras_object(self.fake_score),
            fake_optimizer=keras.saving.serialize_keras_object(
                getattr(self.fake_optimizer, "inner_optimizer", None)
                or self.fake_optimizer
            ),
            fake_updates=self.fake_updates,
            sigma_range=list(self.sigma_range),
            num_train_timesteps=self.num_train_timesteps,
            min_step_percent=self.min_step_percent,
            max_step_percent=self.max_step_percent,
            regression_weight=self.regression_weight,
            seed=self.seed,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for name in ("teacher", "fake_score", "fake_optimizer"):
            if isinstance(config.get(name), dict):
                config[name] = keras.saving.deserialize_keras_object(
                    config[name]
                )
        return super().from_config(config)
