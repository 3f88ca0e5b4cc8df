import keras

from keras_selfdistill import _internals
from keras_selfdistill.teachers.frozen_model import FrozenModel
from keras_selfdistill.teachers.frozen_model import as_teacher
from keras_selfdistill.terms.on_policy import OnPolicy


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class SequenceKD(OnPolicy):
    """Trains on the teacher's continuations of the prompts.

    Sequence-level knowledge distillation: the student learns the
    sequences the teacher generates rather than the dataset's. With
    probability `fraction` per training step, each sequence keeps its
    first `prompt_length` tokens and the teacher writes the rest,
    autoregressively; the labels become the teacher's tokens, so the
    compiled cross-entropy trains on them (Kim & Rush's objective), and a
    `keras_selfdistill.terms.Distillation` term beside it adds the
    token-level divergence on the same sequences (TRL's `seq_kd`). Weights
    are 0 on the prompt's predictions and after a stop token. The
    generation machinery, data format, stopping and seeding are
    `keras_selfdistill.terms.OnPolicy`'s; a KerasHub `CausalLM` teacher
    given as a model or a `FrozenModel` generates with its key/value cache.

    Kim & Rush decode with beam search; here the teacher's most likely
    token is taken at each position (`temperature=0`, greedy decoding, the
    approximation they also report), or a sample at a positive
    temperature.

    Reference:

    - [Kim & Rush, 2016](https://arxiv.org/abs/1606.07947)

    Args:
        teacher: A `keras.Model` (used frozen) or a
            `keras_selfdistill.teachers.Teacher` whose targets are a
            function of the inputs (`FrozenModel`, `EMA`, `Snapshot`,
            `Ensemble`).
        prompt_length: Number of leading tokens kept as the prompt, at
            least 1.
        fraction: Probability in `(0, 1]` that a step trains on the
            teacher's sequences. Defaults to `1.0`.
        temperature: Sampling temperature, `0` for greedy decoding.
            Defaults to `0.0`.
        max_new_tokens: Most tokens generated per sequence, or `None` for
            up to the end of the sequences. Defaults to `None`.
        stop_token_ids: Token ids that end a generated sequence, or
            `None`. Defaults to `None`.
        seed: Integer seed of the sampling. Defaults to `None`.
        name: Name of the term. Defaults to `"sequence_kd"`.

    Example:

    ```python
    distiller = keras_selfdistill.Distiller(
        student,
        terms=[keras_selfdistill.terms.SequenceKD(teacher, prompt_length=16)],
    )
    distiller.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    distiller.fit(windows, epochs=3)
    ```
    """

    # The labels are the teacher's tokens: a compiled loss on them is the
    # method itself.
    _labels_are_targets = True

    def __init__(
        self,
        teacher,
        prompt_length,
        fraction=1.0,
        temperature=0.0,
        seed=None,
        max_new_tokens=None,
        stop_token_ids=None,
        name=None,
        **kwargs,
    ):
        super().__init__(
            prompt_length,
            fraction=fraction,
            temperature=temperature,
            seed=seed,
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids,
            name=name,
            **kwargs,
        )
        self.teacher = as_teacher(teacher, "SequenceKD")
        if any(t.keyed_by_id for t in self.teacher.walk()):
            raise ValueError(
                "SequenceKD runs the teacher on sequences it writes itself, "
                "so its targets must be a function of the inputs; a bank "
                "keyed by sample id has none for them. Use a FrozenModel, "
                "EMA or Snapshot teacher. Received: teacher="
                f"{type(self.teacher).__name__}"
            )

    @property
    def teachers(self):
        return [self.teacher]

    def attach(self, student):
        self.teacher.attach(student)

    def _generator(self):
        def logits_of(inputs):
            # At temperature 1 either kind of target is logits.
            return self.teacher.targets(inputs, None, 1.0)

        return logits_of

    def _cached_decoder(self):
        # Only a plain frozen model is the function the cache computes.
        teacher = self.teacher
        if (
            type(teacher) is FrozenModel
            and teacher.from_logits
            and teacher.input_key is None
        ):
            return _internals.cached_decoder(teacher.model)
        return None

    def get_config(self):
        config = super().get_config()
        config["teacher"] = keras.saving.serialize_keras_object(self.teacher)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["teacher"] = keras.saving.deserialize_keras_object(
            config["teacher"]
        )
        return super().from_config(config)
