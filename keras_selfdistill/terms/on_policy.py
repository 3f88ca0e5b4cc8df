import keras
from keras import ops

from keras_selfdistill import _arguments
from keras_selfdistill import _internals
from keras_selfdistill.terms.term import Term


def _pick(logits, temperature, u):
    """The token where the tempered softmax's cumulative passes `u`."""
    logits = ops.cast(logits, "float32")
    if temperature == 0:
        return ops.argmax(logits, axis=-1)
    cumulative = ops.cumsum(ops.softmax(logits / temperature), -1)
    u = u[:, None] * cumulative[:, -1:]
    return ops.minimum(
        ops.sum(ops.cast(cumulative < u, "int32"), -1), logits.shape[-1] - 1
    )


def continue_sequences(
    logits_of, tokens, prompt_length, temperature, noise, end=None
):
    """Replaces `tokens[:, prompt_length:end]` by tokens sampled one by one.

    `tokens` is `[batch, length]`; position `i` is drawn from
    `softmax(logits_of(tokens)[:, i - 1] / temperature)` with everything
    before it already drawn, so a causal model is sampled autoregressively
    (without a cache: one full forward per token). `temperature=0` takes
    the most likely token. `noise` holds one uniform number per position,
    drawn beforehand: the token is where the cumulative distribution
    passes it (inverse-CDF sampling), so the loop holds no random state.
    `end` defaults to `length`; the tokens from `end` on are kept.
    """
    length = tokens.shape[1]
    positions = ops.arange(length)[None, :]
    noise = ops.cast(noise, "float32")

    def body(i, tokens):
        logits = ops.take(logits_of(tokens), i - 1, axis=1)
        token = _pick(logits, temperature, ops.take(noise, i, axis=1))
        token = ops.cast(token[:, None], tokens.dtype)
        return ops.where(positions == i, token, tokens)

    end = length if end is None else end
    return ops.fori_loop(prompt_length, end, body, tokens)


def continue_with_cache(
    decoder, tokens, prompt_length, temperature, noise, end=None
):
    """`continue_sequences` with a KerasHub causal LM's key/value cache.

    `decoder` is `(build, step)` (`_internals.cached_decoder`): the cache
    is built in one forward over the tokens before `end - 1`, and each new
    token then costs one single-position `step`, as in KerasHub's
    `CausalLM.generate_step`. The samples are `continue_sequences`'s for
    the same `noise`, up to rounding in the model's outputs.
    """
    build, step = decoder
    length = tokens.shape[1]
    end = length if end is None else end
    noise = ops.cast(noise, "float32")
    # Positions from end - 1 on are never read, and a model with learned
    # positions may not have them.
    _, cache = build(tokens[:, : end - 1])
    batch = ops.shape(tokens)[0]

    def body(i, state):
        tokens, cache = state
        previous = ops.slice(tokens, [0, i - 1], [batch, 1])
        logits, _, cache = step(previous, cache, i - 1)
        token = _pick(logits[:, 0], temperature, ops.take(noise, i, axis=1))
        token = ops.cast(token[:, None], tokens.dtype)
        return ops.slice_update(tokens, [0, i], token), cache

    tokens, _ = ops.fori_loop(prompt_length, end, body, (tokens, cache))
    return tokens


@keras.saving.register_keras_serializable(package="keras_selfdistill")
class OnPolicy(Term):
    """Trains on the student's own continuations of the prompts (GKD).

    With probability `fraction` per training step, the batch's sequences
    keep their first `prompt_length` tokens and the rest is sampled from
    the student, autoregressively, with its current weights; the teacher
    then scores these sequences through the distiller's other terms (a
    `keras_selfdistill.terms.Distillation` with `loss="jsd"`), and the
    loss is taken on the generated tokens only (sample weights are 0 on
    the prompt's predictions and 1 on the generated ones). The other
    steps use the dataset's sequences as given (off-policy). This is
    Generalized Knowledge Distillation's mixture: `fraction` is its `λ`,
    and a fraction of 1 is fully on-policy.

    The student must be causal (each position reads only the tokens
    before it), as every causal LM is; a bidirectional model would see
    the not-yet-generated tokens. The data are causal-LM batches: `x` is
    `[batch, length]` token ids, or a dict with `"token_ids"` (and
    `"padding_mask"`, set to 1 on generated sequences), as KerasHub's
    preprocessors give; `y`, when present, is `x` shifted by one token,
    and its last token is generated too.

    Generation stops after `max_new_tokens` tokens (TRL's
    `max_new_tokens`) or at the end of the sequences, whichever is first,
    and a sequence ends at its first generated token in `stop_token_ids`:
    the predictions after it (and after `max_new_tokens`) have weight 0,
    so the loss covers the generated tokens up to and including the stop
    token, as TRL's completion mask does. The student is called in
    inference mode (no dropout) while it generates. A KerasHub `CausalLM`
    student generates with its key/value cache, the path its
    `generate_step` takes: one forward over the prompts, then one
    single-token step per new token. Any other model is run once per new
    token over the whole sequence, which costs about `max_new_tokens`
    forwards of the student per on-policy step.

    KerasHub's `CausalLM.generate` itself is not called: it compiles its
    own function outside the training step, and its sampler draws from a
    seed generator that `fit`'s stateless JAX step does not carry, so it
    would repeat its draws. Sampling here is by temperature over the whole
    vocabulary (KerasHub's `"random"` sampler; `0` is its `"greedy"`),
    from this term's seed generator.

    Every sequence needs at least `prompt_length` real tokens: a shorter
    one's padding would become part of its prompt (the generated
    sequences have no padding). Right-padded windows of a fixed length, or
    KerasHub's preprocessed batches with a `prompt_length` below the
    shortest sequence, qualify. TRL samples at temperature 0.9 by default;
    the default here is the model's own distribution (1.0).

    GKD minimises only the divergence: compile the distiller without a
    `loss`. A compiled loss would train on the student's own samples as if
    they were labels, so it is refused. The coin and the samples draw from
    this term's seed generator, a variable: a resumed run draws what an
    uninterrupted one does.

    Reference:

    - [Agarwal et al., 2024](https://arxiv.org/abs/2306.13649) (GKD);
      TRL's `GKDTrainer.training_step` (`lmbda`, student sampling,
      completion-only loss).

    Args:
        prompt_length: Number of leading tokens kept as the prompt, at
            least 1.
        fraction: Probability in `(0, 1]` that a step is on-policy (GKD's
            `λ`). Defaults to `1.0`.
        temperature: Sampling temperature, `0` for the most likely token.
            Defaults to `1.0`.
        max_new_tokens: Most tokens generated per sequence, at least 1, or
            `None` for up to the end of the sequences. Defaults to `None`.
        stop_token_ids: Token ids that end a generated sequence (e.g. the
            tokenizer's end-of-sequence id), or `None`. Defaults to `None`.
        seed: Integer seed of the sampling. Defaults to `None`.
        name: Name of the term. Defaults to `"on_policy"`.

    Example:

    ```python
    distiller = keras_selfdistill.Distiller(
        student,
        terms=[
            keras_selfdistill.terms.Distillation(
                teacher, loss="jsd", beta=0.5,
                reduction="mean_with_sample_weight"),
            keras_selfdistill.terms.OnPolicy(prompt_length=16, fraction=0.5),
        ],
    )
    distiller.compile(optimizer="adam")
    distiller.fit(windows, epochs=3)
    ```
    """

    rewrites_batch = True

    def __init__(
        self,
        prompt_length,
        fraction=1.0,
        temperature=1.0,
        seed=None,
        max_new_tokens=None,
        stop_token_ids=None,
        name=None,
        **kwargs,
    ):
        kwargs.pop("weight", None)
        kwargs.pop("xi", None)
        super().__init__(name=name, **kwargs)
        if not _arguments.is_integer(prompt_length) or prompt_length < 1:
            raise ValueError(
                "`prompt_length` is the number of leading tokens kept as the "
                "prompt and must be an integer >= 1. "
                f"Received: prompt_length={prompt_length!r}"
            )
        if not _arguments.is_number(fraction) or not 0 < fraction <= 1:
            raise ValueError(
                "`fraction` is the probability that a step trains on "
                "generated sequences (GKD's lambda) and must be in (0, 1]. "
                f"Received: fraction={fraction!r}"
            )
        if not _arguments.is_number(temperature) or temperature < 0:
            raise ValueError(
                "`temperature` must be a number >= 0 (0 takes the most "
                f"likely token). Received: temperature={temperature!r}"
            )
        if seed is not None and not _arguments.is_integer(seed):
            raise TypeError(
                f"`seed` must be an integer or None. Received: seed={seed!r}"
            )
        if max_new_tokens is not None and (
            not _arguments.is_integer(max_new_tokens) or max_new_tokens < 1
        ):
            raise ValueError(
                "`max_new_tokens` must be an integer >= 1 or None. "
                f"Received: max_new_tokens={max_new_tokens!r}"
            )
        if isinstance(stop_token_ids, int):
            stop_token_ids = (stop_token_ids,)
        if stop_token_ids is not None and (
            isinstance(stop_token_ids, (str, bytes))
            or not stop_token_ids
            or not all(
                _arguments.is_integer(t) and t >= 0 for t in stop_token_ids
            )
        ):
            raise ValueError(
                "`stop_token_ids` must be token ids (integers >= 0), e.g. "
                "`(tokenizer.end_token_id,)`, or None. "
                f"Received: stop_token_ids={stop_token_ids!r}"
            )
        self.max_new_tokens = (
            None if max_new_tokens is None else int(max_new_tokens)
        )
        self.stop_token_ids = (
            None
            if stop_token_ids is None
            else tuple(int(t) for t in stop_token_ids)
        )
        self.prompt_length = int(prompt_length)
        self.fraction = float(fraction)
        self.temperature = float(temperature)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def has_loss(self):
        return False

    def compute_loss(self, x, y, y_pred, sample_weight, step, epoch):
        raise TypeError(
            f"Term '{self.name}' replaces the training batch and has no "
            "loss of its own."
        )

    def _generator(self):
        """`tokens -> logits` of the model that writes the continuations."""
        distiller = self._model()
        final = distiller._forward.final

        def logits_of(inputs):
            if isinstance(inputs, dict) and distiller.input_key is not None:
                inputs = inputs[distiller.input_key]
            return final(inputs, training=False)

        return logits_of

    def _cached_decoder(self):
        """The writer's KerasHub key/value-cache decoding, or `None`."""
        return _internals.cached_decoder(self._model().student)

    # Whether the rewritten labels are meant for the compiled loss.
    _labels_are_targets = False

    def _check(self):
        if self._labels_are_targets:
            return
        if _internals.compiled_loss(self._model()) is not None:
            raise ValueError(
                f"Term '{self.name}' trains on the student's own samples, "
                "which have no ground-truth labels: a compiled loss would "
                "treat them as labels. Compile the distiller without `loss` "
                "(GKD minimises the divergence alone)."
            )

    def rewrite_batch(self, x, y, sample_weight):
        self._check()
        tokens = x["token_ids"] if isinstance(x, dict) else x
        if len(tokens.shape) != 2 or tokens.shape[1] is None:
            raise ValueError(
                f"Term '{self.name}' continues token sequences: the inputs "
                "must be `[batch, length]` token ids (or a dict with "
                "'token_ids') of a fixed length. Received: shape "
                f"{tuple(tokens.shape)}"
            )
        length = tokens.shape[1]
        if self.prompt_length >= length:
            raise ValueError(
                f"Term '{self.name}' keeps {self.prompt_length} prompt tokens "
                f"of sequences of {length}: nothing is left to generate. "
                f"Received: prompt_length={self.prompt_length}"
            )
        weights = ops.ones(ops.shape(tokens), "float32")
        if sample_weight is not None:
            sample_weight = ops.cast(sample_weight, "float32")
            if len(sample_weight.shape) == 1:
                sample_weight = sample_weight[:, None]
            weights = weights * sample_weight
        generate = self._generator()
        decoder = self._cached_decoder()
        # The generated sequence is length + 1 tokens (x and y's last).
        end = length + 1
        if self.max_new_tokens is not None:
            end = min(end, self.prompt_length + self.max_new_tokens)
        # Drawn outside the generation loop and the branch, so that the
        # seed generator's variable advances once per step on both backends.
        noise = keras.random.uniform(
            (ops.shape(tokens)[0], length + 1), seed=self.seed_generator
        )
        coin = keras.random.uniform((), seed=self.seed_generator)

        def generated():
            # The sequence is x followed by y's last token: length + 1.
            if y is not None:
                full = ops.concatenate(
                    [tokens, ops.cast(y[:, -1:], tokens.dtype)], axis=1
                )
            else:
                full = ops.concatenate([tokens, tokens[:, -1:]], axis=1)

            def logits_of(sequence):
                inputs = sequence[:, :length]
                if isinstance(x, dict):
                    inputs = dict(x, token_ids=inputs)
                    if "padding_mask" in x:
                        inputs["padding_mask"] = ops.ones_like(
                            x["padding_mask"]
                        )
                return generate(inputs)

            if decoder is not None:
                full = continue_with_cache(
                    decoder,
                    full,
                    self.prompt_length,
                    self.temperature,
                    noise,
                    end,
                )
            else:
                full = continue_sequences(
                    logits_of,
                    full,
                    self.prompt_length,
                    self.temperature,
                    noise,
                    end,
                )
            new_x = full[:, :length]
            if isinstance(x, dict):
                new_x = dict(x, token_ids=new_x)
                if "padding_mask" in x:
                    new_x["padding_mask"] = ops.ones_like(x["padding_mask"])
            new_y = None if y is None else ops.cast(full[:, 1:], "int32")
            return new_x, new_y, self._generated_weights(full, end)

        if self.fraction == 1.0:
            return generated()
        # Labels are int32 on both branches: JAX has no int64 without x64.
        labels = None if y is None else ops.cast(y, "int32")
        return ops.cond(
            coin < self.fraction, generated, lambda: (x, labels, weights)
        )

    def _generated_weights(self, full, end):
        """1 on the predictions of generated tokens, up to a stop token.

        Position t predicts token t + 1 of `full`: the loss counts the
        positions from prompt_length - 1 to end - 2, and, with stop
        tokens, those whose earlier generated tokens hold none.
        """
        length = full.shape[1] - 1
        positions = ops.arange(length)[None, :]
        keep = ops.logical_and(
            positions >= self.prompt_length - 1, positions < end - 1
        )
        if self.stop_token_ids is not None:
            stops = ops.any(
                ops.equal(
                    full[:, :length, None],
                    ops.convert_to_tensor(self.stop_token_ids, full.dtype),
                ),
                axis=-1,
            )
            stops = ops.logical_and(stops, positions >= self.prompt_length)
            seen = ops.cumsum(ops.cast(stops, "int32"), axis=1)
            keep = ops.logical_and(keep, seen == 0)
        return ops.cast(
            ops.broadcast_to(keep, ops.shape(full[:, :length])), "float32"
        )

    def get_config(self):
        config = super().get_config()
        config.pop("weight", None)
        config.pop("xi", None)
        config.update(
            prompt_length=self.prompt_length,
            fraction=self.fraction,
            temperature=self.temperature,
            seed=self.seed,
            max_new_tokens=self.max_new_tokens,
            stop_token_ids=self.stop_token_ids,
        )
        return config
