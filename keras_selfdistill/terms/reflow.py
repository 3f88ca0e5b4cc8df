import keras
from keras import ops

from keras_selfdistill._ddim import CosineSchedule
from keras_selfdistill._ddim import alpha_sigma
from keras_selfdistill._ddim import per_sample
from keras_selfdistill.terms.denoising import check_two_inputs
from keras_selfdistill.terms.term import Term


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class Reflow(Term):
    """Regresses a one-step sampler on a teacher's noise–image pairs.

    The simplest one-step generator: the teacher's deterministic sampler
    maps noise `ε` to an image `x = S(ε)` once, offline
    (`keras_selfdistill.diffusion.sample`), and the student learns the map
    in one step. The student is a v-prediction model sampled with one DDIM
    step, `x̂ = α_1·ε − σ_1·v(ε, λ(1))` (what
    `keras_selfdistill.diffusion.sample(student, ε, 1)` returns, before
    its clipping), and the loss is `‖x̂ − x‖²` averaged over pixels. A
    student initialised from the teacher starts as the teacher's one-step
    sampler.

    Fit on pairs `(noise, image)`: inputs the noise, targets the images
    (in `[−1, 1]`); a compiled `loss` is refused, the term is the loss.

    Reference:

    - [Luhman & Luhman, 2021](https://arxiv.org/abs/2101.02388), the
      student regressed on DDIM's noise-to-image map;
    - [Liu et al., 2023](https://arxiv.org/abs/2209.03003) (rectified
      flow), whose one-step distillation of a flow's pairs this is; the
      reflow of a flow itself (training a new flow on the pairs) is not
      implemented.

    Args:
        schedule: The `keras_selfdistill.diffusion.CosineSchedule` of the
            sampler. Defaults to `CosineSchedule()`.
        weight: Number or schedule multiplying the term. Defaults to `1.0`.
        name: Name of the term. Defaults to `"reflow"`.

    Example:

    ```python
    noise = numpy.random.default_rng(0).normal(size=(60000, 28, 28, 1))
    images = keras_selfdistill.diffusion.sample(teacher, noise, 64)
    distiller = keras_selfdistill.Distiller(
        student, [keras_selfdistill.terms.Reflow()])
    distiller.compile(optimizer=keras.optimizers.Adam(2e-4))
    distiller.fit(noise.astype("float32"), images, batch_size=128)
    ```
    """

    rewrites_batch = True

    def __init__(self, schedule=None, weight=1.0, name=None, **kwargs):
        kwargs.pop("xi", None)
        super().__init__(weight=weight, name=name, **kwargs)
        if schedule is not None and not isinstance(schedule, CosineSchedule):
            raise TypeError(
                "`schedule` must be a "
                "`keras_selfdistill.diffusion.CosineSchedule`. Received: "
                f"schedule={schedule!r}"
            )
        self.schedule = CosineSchedule() if schedule is None else schedule

    @property
    def reads_logits(self):
        return False

    @property
    def evaluates(self):
        return False

    def attach(self, student):
        check_two_inputs("Reflow", student)

    def rewrite_batch(self, x, y, sample_weight):
        if y is None or isinstance(x, (dict, list, tuple)):
            raise ValueError(
                f"Term '{self.name}' reads pairs `(noise, image)`: the "
                "teacher's sampler's starting noise as inputs and its "
                "images as targets. Received: "
                + ("inputs without targets" if y is None else f"inputs {x!r}")
            )
        noise = ops.cast(x, "float32")
        logsnr = self.schedule(ops.ones((ops.shape(noise)[0],)))
        labels = {"z": noise, "logsnr": logsnr, "target": y}
        return [noise, logsnr], labels, sample_weight

    def compute_loss(self, x, y, y_pred, sample_weight, step, epoch):
        z = ops.cast(y["z"], "float32")
        target = ops.cast(y["target"], "float32")
        if tuple(target.shape[1:]) != tuple(z.shape[1:]):
            raise ValueError(
                f"Term '{self.name}' pairs each noise with an image of its "
                f"shape. Received: noise {tuple(z.shape)}, images "
                f"{tuple(target.shape)}"
            )
        alpha, sigma = per_sample(alpha_sigma(y["logsnr"]), z)
        estimate = alpha * z - sigma * ops.cast(y_pred, "float32")
        axes = tuple(range(1, len(z.shape)))
        error = ops.mean(ops.square(estimate - target), axes)
        return self.reduce(error, sample_weight)

    def get_config(self):
        config = super().get_config()
        config.pop("xi", None)
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
