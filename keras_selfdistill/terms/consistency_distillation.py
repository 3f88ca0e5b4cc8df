import keras
from keras import ops

from keras_selfdistill import _arguments
from keras_selfdistill._consistency import SIGMA_DATA
from keras_selfdistill._consistency import checked_sigma_range
from keras_selfdistill._consistency import consistency_function
from keras_selfdistill._consistency import consistency_output
from keras_selfdistill._consistency import heun_step
from keras_selfdistill._consistency import karras_sigmas
from keras_selfdistill._consistency import pseudo_huber_constant
from keras_selfdistill._consistency import velocity_inputs
from keras_selfdistill._ddim import per_sample
from keras_selfdistill.teachers.ema import EMA
from keras_selfdistill.terms.denoising import check_image_range
from keras_selfdistill.terms.denoising import check_two_inputs
from keras_selfdistill.terms.denoising import frozen_diffusion_teacher
from keras_selfdistill.terms.denoising import noise_and_uniform
from keras_selfdistill.terms.denoising import unconditional_images
from keras_selfdistill.terms.term import Term

DISTANCES = ("l2", "pseudo_huber")
_RHO = 7.0


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class ConsistencyDistillation(Term):
    """Distils a diffusion model into a consistency model (one-step sampler).

    Consistency distillation (CD) trains a student `f(x_σ, σ)` to map any
    point of the teacher's probability-flow ODE trajectory to its start.
    Each step draws, for every image `x`, a step `n` uniformly from the
    `N − 1` intervals of EDM's noise levels `σ_1 > … > σ_N` (from
    `sigma_range[1]` down to `sigma_range[0]`, `ρ = 7`), noises
    `x_{σ_n} = x + σ_n·ε`, takes one Heun step of the frozen teacher's ODE
    to `σ_{n+1}`, and regresses the student's `f(x_{σ_n}, σ_n)` on the
    target network's `f(x̂_{σ_{n+1}}, σ_{n+1})`, with weight 1 at every
    step. The target network is an exponential moving average of the
    student (`keras_selfdistill.teachers.EMA`, momentum 0.95 as the
    official CD), updated after every optimizer step.

    The student is a v-prediction model like its teacher, called as
    `student([z, λ])`; the consistency function wraps it with the
    paper's skip and output scalings, `c_skip(σ)·x_σ + c_out(σ)·(−v)`
    with `σ_data = 1` (the value at which EDM's parameterisation is
    v-prediction's), so that `f(x, σ_min) = x` and a student that starts
    from the teacher's weights starts near the teacher's denoiser, as the
    official code starts it. Sample it with
    `keras_selfdistill.diffusion.consistency_sample`.

    Distances: `"l2"`, the mean squared error over pixels (the paper's
    L2), or `"pseudo_huber"`, `√(‖a − b‖² + c²) − c` with
    `c = 0.00054·√d` (Song & Dhariwal's improved consistency training).
    The paper's best CD uses LPIPS, whose VGG weights cannot be downloaded
    here: it is not offered.

    Compile the distiller without a `loss` and fit it on images alone, in
    `[−1, 1]`; noise and steps come from the term's seed generator, so a
    resumed run draws what an uninterrupted one draws.

    Reference:

    - [Song et al., 2023](https://arxiv.org/abs/2303.01469), algorithm 2;
      `consistency_losses` and `heun_solver` of the official code
      (`openai/consistency_models`, `cm/karras_diffusion.py`), whose
      index draw, Heun step, target network call and uniform weighting
      this follows.
    - [Song & Dhariwal, 2023](https://arxiv.org/abs/2310.14189), the
      pseudo-Huber distance.

    Args:
        teacher: The frozen v-prediction diffusion model (a `keras.Model`
            called as `model([z, logsnr])`, or a
            `keras_selfdistill.teachers.FrozenModel` of one), trained over
            log-SNRs covering `−2·log σ` for the whole `sigma_range`.
        num_scales: `N`, the number of noise levels. Defaults to `18` (the
            official CIFAR-10 CD).
        target: The target network: a `keras_selfdistill.teachers.EMA` of
            the student. Defaults to `EMA(momentum=0.95)`.
        distance: `"l2"` or `"pseudo_huber"`. Defaults to `"l2"`.
        sigma_range: `(σ_min, σ_max)`. Defaults to `(0.002, 80.0)`.
        seed: Integer seed of the noise and steps. Defaults to `None`.
        weight: Number or schedule multiplying the term. Defaults to `1.0`.
        name: Name of the term. Defaults to `"consistency_distillation"`.

    Example:

    ```python
    student = keras.models.clone_model(base_model)
    student.set_weights(base_model.get_weights())
    distiller = keras_selfdistill.Distiller(
        student,
        [keras_selfdistill.terms.ConsistencyDistillation(base_model)],
    )
    distiller.compile(optimizer=keras.optimizers.Adam(4e-4))
    distiller.fit(images, batch_size=128, epochs=2)
    samples = keras_selfdistill.diffusion.consistency_sample(student, noise)
    ```
    """

    rewrites_batch = True

    def __init__(
        self,
        teacher,
        num_scales=18,
        target=None,
        distance="l2",
        sigma_range=(0.002, 80.0),
        seed=None,
        weight=1.0,
        name=None,
        **kwargs,
    ):
        kwargs.pop("xi", None)
        super().__init__(weight=weight, name=name, **kwargs)
        teacher = frozen_diffusion_teacher("ConsistencyDistillation", teacher)
        if not _arguments.is_integer(num_scales) or num_scales < 2:
            raise ValueError(
                "`num_scales` must be an integer >= 2 (18 in the official "
                f"CIFAR-10 CD). Received: num_scales={num_scales!r}"
            )
        if target is None:
            target = EMA(momentum=0.95, name=f"{self.name}_target")
        if not isinstance(target, EMA):
            raise TypeError(
                "`target` must be a `keras_selfdistill.teachers.EMA` of the "
                f"student. Received: target={target!r}"
            )
        if distance not in DISTANCES:
            raise ValueError(
                f"`distance` must be one of {DISTANCES}. Received: "
                f"distance={distance!r}"
            )
        sigma_range = checked_sigma_range(sigma_range)
        if seed is not None and not _arguments.is_integer(seed):
            raise TypeError(
                f"`seed` must be an integer or None. Received: seed={seed!r}"
            )
        self.teacher = teacher
        self.num_scales = int(num_scales)
        self.target = target
        self.distance = distance
        self.sigma_range = sigma_range
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.sigmas = karras_sigmas(
            self.num_scales, *self.sigma_range, rho=_RHO
        )

    @property
    def teachers(self):
        return [self.teacher, self.target]

    @property
    def reads_logits(self):
        return False

    @property
    def evaluates(self):
        return False

    def attach(self, student):
        check_two_inputs("ConsistencyDistillation", student)
        teacher = self.teacher.model
        check_two_inputs("ConsistencyDistillation teacher's", teacher)
        if tuple(teacher.output_shape) != tuple(student.output_shape):
            raise ValueError(
                "The student and the teacher must both predict the "
                "velocity of the same images: their outputs differ. "
                f"Received: student output {student.output_shape}, "
                f"teacher output {teacher.output_shape}"
            )
        shapes = [tuple(i.shape) for i in getattr(student, "inputs", [])]
        if shapes and shapes[0] != tuple(student.output_shape):
            raise ValueError(
                "A consistency model maps noisy images to images: the "
                "student's output must have the shape of its image input. "
                f"Received: input {shapes[0]}, output {student.output_shape}"
            )
        self.teacher.attach(student)
        self.target.attach(student)

    def check_batch(self, x):
        check_image_range(self.name, x)

    def rewrite_batch(self, x, y, sample_weight):
        images = unconditional_images(self.name, x, y)
        eps, uniform = noise_and_uniform(images, self.seed_generator)
        intervals = self.num_scales - 1
        n = ops.minimum(
            ops.cast(ops.floor(uniform * intervals), "int32"), intervals - 1
        )
        sigmas = ops.convert_to_tensor(self.sigmas, "float32")
        sigma = ops.take(sigmas, n)
        next_sigma = ops.take(sigmas, n + 1)
        noisy = images + per_sample([sigma], images)[0] * eps
        solved = heun_step(self.teacher.model, noisy, sigma, next_sigma)
        target = consistency_function(
            self.target.model,
            solved,
            next_sigma,
            self.sigma_range[0],
            SIGMA_DATA,
            training=False,
        )
        labels = {
            "x": noisy,
            "sigma": sigma,
            "target": ops.stop_gradient(target),
        }
        return velocity_inputs(noisy, sigma), labels, sample_weight

    def compute_loss(self, x, y, y_pred, sample_weight, step, epoch):
        return self.reduce(self.per_sample_loss(y, y_pred), sample_weight)

    def per_sample_loss(self, y, velocity):
        """The distance of each sample from its target, from the labels."""
        estimate = consistency_output(
            velocity, y["x"], y["sigma"], self.sigma_range[0], SIGMA_DATA
        )
        square = ops.square(estimate - ops.cast(y["target"], "float32"))
        axes = tuple(range(1, len(square.shape)))
        if self.distance == "l2":
            return ops.mean(square, axes)
        c = pseudo_huber_constant(square.shape[1:])
        return ops.sqrt(ops.sum(square, axes) + c**2) - c

    def get_config(self):
        config = super().get_config()
        config.pop("xi", None)
        config["teacher"] = keras.saving.serialize_keras_object(self.teacher)
        config["target"] = keras.saving.serialize_keras_object(self.target)
        config["num_scales"] = self.num_scales
        config["distance"] = self.distance
        config["sigma_range"] = list(self.sigma_range)
        config["seed"] = self.seed
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for name in ("teacher", "target"):
            if isinstance(config.get(name), dict):
                config[name] = keras.saving.deserialize_keras_object(
                    config[name]
                )
        return super().from_config(config)
